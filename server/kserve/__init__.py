"""The Open Inference Protocol (KServe v2, `inference.GRPCInferenceService`) with Triton's sequence extension.

servicer: the RPC handlers on the engine; codec: tensors and request parameters; config: model
metadata and Triton's model configuration; sequences: sequence ids onto engine sessions;
descriptors: the protocol's messages from a private descriptor pool (grpc_service.desc, package data);
statistics: Triton's statistics extension (ModelStatistics); control: the model-repository extension
(RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload).
The App registers it beside the native servicer.
"""
from .descriptors import SERVICE, messages
from .servicer import KServeServicer, handler

__all__ = ["SERVICE", "KServeServicer", "handler", "messages"]

"""The Open Inference Protocol's messages, built at run time from a private descriptor pool.

tritonclient's generated stubs register `inference.*` in protobuf's default pool; stubs of
our own would define the same full names from other files and clash ("duplicate symbol")
in any process importing both (our tests, users embedding the server). So the protos under
protos/inference/ are compiled (by scripts/protogen.py, `make protos`) to one serialized
FileDescriptorSet, grpc_service.desc, shipped as this package's data and loaded here into a
pool of our own.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib.resources import files
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

DESC_NAME = "grpc_service.desc"
SERVICE = "inference.GRPCInferenceService"


def descriptor_set() -> bytes:
    """The serialized FileDescriptorSet of the inference protos (package data beside this module)."""
    return (files(__package__) / DESC_NAME).read_bytes()


@dataclass(frozen=True)
class Messages:
    """The message classes of the protocol, from the private pool, looked up by short name."""

    pool: descriptor_pool.DescriptorPool
    classes: dict[str, type]

    def __getattr__(self, name: str) -> Any:
        """Message class by its short name (e.g. pb.ModelInferRequest)."""
        try:
            return self.classes[name]
        except KeyError:
            raise AttributeError(name) from None

    def method_types(self, method: str) -> tuple[type, type, bool, bool]:
        """(request class, response class, client streaming, server streaming) of one RPC."""
        m = self.pool.FindServiceByName(SERVICE).methods_by_name[method]
        return (message_factory.GetMessageClass(m.input_type),
                message_factory.GetMessageClass(m.output_type),
                m.client_streaming, m.server_streaming)

    def method_names(self) -> list[str]:
        """Every RPC the service declares, in declaration order."""
        return [m.name for m in self.pool.FindServiceByName(SERVICE).methods]


@functools.cache
def messages() -> Messages:
    """Load the descriptor set into a fresh private pool (once per process) and build the classes."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    classes: dict[str, type] = {}
    for f in fds.file:
        fd = pool.FindFileByName(f.name)
        for name, desc in fd.message_types_by_name.items():
            classes[name] = message_factory.GetMessageClass(desc)
    return Messages(pool=pool, classes=classes)

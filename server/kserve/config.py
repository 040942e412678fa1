"""How rnnserve's models look through the Open Inference Protocol: metadata and Triton model config.

A token model takes `tokens` (INT64, [1, -1]) and answers `logits` (FP32, [1, -1, vocab]) and,
when asked, `state` (FP32, [1, state_size]); a vector model takes `inputs` (FP32, [1, -1, F]) and
answers its named outputs (see `tensors`). The configuration sets `sequence_batching`, so a Triton
client (perf_analyzer included) sees the model is stateful and drives it with sequence ids.
"""
from __future__ import annotations

import json
from typing import Any

from .. import vectors
from ..errors import InvalidArgument, shown
from ..repository import ModelVersion
from ..settings import Settings

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"


def parse_version(text: str) -> int:
    """A request's model_version string -> int (0 = latest); INVALID_ARGUMENT when not a positive integer."""
    if not text:
        return 0
    if not (text.isascii() and text.isdigit() and len(text) <= 18) or int(text) <= 0:
        raise InvalidArgument(f"model_version must be a positive integer (or empty for the latest), "
                              f"got {shown(text)}")
    return int(text)


def tensors(mv: ModelVersion) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) of a model version as (name, datatype, shape) with -1 for variable sizes.

    A vector model takes `inputs` frames (FP32 [1, T, F]) and answers its raw `outputs`, `state` and its named
    answers (`probabilities`, or `mean` and `spread`; with a `horizon` parameter also `forecast_*`, [1, H, F])."""
    state = ("state", "FP32", [1, mv.state_size])
    if mv.kind != "vector":
        return [("tokens", "INT64", [1, -1])], [("logits", "FP32", [1, -1, mv.vocab_size]), state]
    F = mv.features
    named = vectors.named_outputs(mv)
    width = {"probabilities": mv.output_size, "mean": F, "spread": F}
    outputs = [("outputs", "FP32", [1, -1, mv.output_size]), state, *[(n, "FP32", [1, -1, width[n]]) for n in named]]
    if mv.meta.task == "forecast":
        outputs += [("forecast_" + n, "FP32", [1, -1, F]) for n in named]
    return [("inputs", "FP32", [1, -1, F])], outputs


def fill_metadata(resp: Any, mv: ModelVersion, versions: list[int]) -> None:
    """Fill a ModelMetadataResponse: name, every loaded version, platform, inputs, outputs."""
    resp.name = mv.name
    resp.versions.extend(str(v) for v in versions)
    resp.platform = PLATFORM
    ins, outs = tensors(mv)
    for field, specs in ((resp.inputs, ins), (resp.outputs, outs)):
        for name, dtype, shape in specs:
            t = field.add()
            t.name, t.datatype = name, dtype
            t.shape.extend(shape)


def fill_config(cfg: Any, mv: ModelVersion, versions: list[int], settings: Settings, pb: Any) -> None:
    """Fill a ModelConfig: tensors, version policy and `sequence_batching` (the model is stateful)."""
    dtypes = {"INT64": pb.pool.FindEnumTypeByName("inference.DataType").values_by_name["TYPE_INT64"].number,
              "FP32": pb.pool.FindEnumTypeByName("inference.DataType").values_by_name["TYPE_FP32"].number}
    cfg.name = mv.name
    cfg.platform = PLATFORM
    cfg.backend = BACKEND
    if settings.serve_versions:
        cfg.version_policy.latest.num_versions = settings.serve_versions
    else:
        cfg.version_policy.all.SetInParent()
    cfg.max_batch_size = 0  # dims include the batch dimension (1); the server batches across sequences
    ins, outs = tensors(mv)
    for name, dtype, shape in ins:
        t = cfg.input.add()
        t.name, t.data_type = name, dtypes[dtype]
        t.dims.extend(shape)
    for name, dtype, shape in outs:
        t = cfg.output.add()
        t.name, t.data_type = name, dtypes[dtype]
        t.dims.extend(shape)
    sb = cfg.sequence_batching
    sb.max_sequence_idle_microseconds = int(settings.idle_timeout * 1_000_000)  # 0 = never expires
    sb.oldest.max_candidate_sequences = min(settings.max_sessions, 2**31 - 1)
    sb.oldest.max_queue_delay_microseconds = int(settings.max_wait_ms * 1000)
    sb.oldest.preferred_batch_size.append(settings.max_batch)
    st = sb.state.add()  # the recurrent state the server carries between a sequence's requests
    st.input_name, st.output_name, st.data_type = "state", "state_out", dtypes["FP32"]
    st.dims.extend([mv.state_size])
    meta = mv.meta
    params = {
        "cell": meta.cell,
        "vocab": json.dumps(mv.vocab),
        "state_size": str(mv.state_size),
        "hidden_size": str(meta.hidden_size),
        "layers": str(meta.layers),
        "version": str(mv.version),
        "loaded_versions": ",".join(str(v) for v in versions),
        "idle_timeout_s": f"{settings.idle_timeout:g}",
        "initial_state": "the model's own (model.json initial_state) on sequence_start",
    }
    if mv.kind == "vector":  # what a tritonclient user needs to read the answers: class names, frame width
        params.update({"input_kind": "vector", "features": str(mv.features), "task": meta.task,
                       "classes": json.dumps(list(meta.classes)), "feature_names": json.dumps(
                           list(meta.input_spec.get("names", [])))})
        del params["vocab"]
    for k, v in params.items():
        cfg.parameters[k].string_value = v

"""The ONNX contract, the one seam between trainer and server: what a version folder holds and how it is checked.

A model repository is `<root>/<name>/<version>/` holding `model.json` and the ONNX graphs named in
`ONNX_FILES`, plus those of `OPTIONAL_FILES` that model.json's `files` lists (`ModelMeta.onnx_files`).

Two kinds of model share the seam, told apart by model.json's `input.kind` (`tokens` when absent):
- token models (character language models, task `lm`): the graphs of `IO`, model.json as `SCHEMA`.
- vector models (numeric sequences: speech frames, sensor readings), the graphs of `VECTOR_IO`:
    model.onnx     inputs float32 (B, F),    state (B, S) -> outputs (B, O),    state_out (B, S)
    sequence.onnx  inputs float32 (B, T, F), state (B, S) -> outputs (B, T, O), state_out (B, S)
  Inputs are raw values: each graph normalises them itself ((x - mean) / std, model.json's `input`).
  model.json has no `vocab` or `embed_size`; it has `input` = {"kind": "vector", "features": F,
  "mean": [F], "std": [F > 0], "names": [F strings, optional]} and `task`, one of
    {"kind": "classify", "classes": [O names], "labels": "sequence" | "step"}: `outputs` are the
      logits of the classes (softmax over the last axis gives probabilities). "sequence": the model was
      trained on one label per sequence read at its last step, so the answer is the output after the
      last frame (earlier steps are the running answer so far); "step": every step has its own label.
    {"kind": "forecast", "outputs": ["mean", "log_var"] | ["mean"], "output_size": O, "horizon": H
      (optional)}: step t's outputs predict the NEXT input x_{t+1}, in raw units (the graphs undo the
      normalisation): outputs[..., :F] is the mean, outputs[..., F:2F] (when listed) the natural log of
      the variance of a diagonal Gaussian, so its spread is exp(0.5 * log_var). O = F * len(outputs).
      An H-step forecast feeds each predicted mean back as the next input (the trainer's rollout);
      `horizon` is the H the export measured.
  A vector model has no generate.onnx; its graphs' metadata_props carry `cell`, `input` and `task`
  (the same JSON objects as model.json) instead of `vocab`.
This module is torch-free (json, numpy, onnxruntime), so the server imports it and the exporter imports
it from here: one schema of `model.json`, one checksum, one set of graph checks, and
so one answer to "is this version usable" for `rnn-serve`, `rnn-export` and `rnn-export list`.
"""
# One package, three rooms: meta (names, IO tables, model.json schema), checks (checksums and graph
# checks), default (the default pointer). Everything is imported from here: `from rnnserve.server.contract import X`.
from .checks import (
    check_files,
    check_generate,
    check_session,
    check_step,
    check_version,
    ir_version_of,
    model_names,
    open_session,
    sha256_bytes,
    sha256_file,
    verify_version_dir,
    version_numbers,
)
from .default import (
    DEFAULT_FILE,
    DEFAULT_KEYS,
    DefaultPointer,
    parse_default,
    read_default,
    write_default,
)
from .meta import (
    CELLS,
    FORECAST_OUTPUTS,
    GENERATE_FILE,
    INPUT_KINDS,
    IO,
    IR_VERSION,
    LABEL_MODES,
    META_FILE,
    ONNX_FILES,
    OPSET,
    OPTIONAL_FILES,
    REQUIRED_KEYS,
    SCHEMA,
    SEQUENCE_FILE,
    STEP_FILE,
    TASKS,
    TOKEN_KEYS,
    VECTOR_IO,
    VECTOR_REQUIRED_KEYS,
    ModelFormatError,
    ModelMeta,
    parse_meta,
    read_meta,
)

__all__ = [
    "CELLS",
    "DEFAULT_FILE",
    "DEFAULT_KEYS",
    "FORECAST_OUTPUTS",
    "GENERATE_FILE",
    "INPUT_KINDS",
    "IO",
    "IR_VERSION",
    "LABEL_MODES",
    "META_FILE",
    "ONNX_FILES",
    "OPSET",
    "OPTIONAL_FILES",
    "REQUIRED_KEYS",
    "SCHEMA",
    "SEQUENCE_FILE",
    "STEP_FILE",
    "TASKS",
    "TOKEN_KEYS",
    "VECTOR_IO",
    "VECTOR_REQUIRED_KEYS",
    "DefaultPointer",
    "ModelFormatError",
    "ModelMeta",
    "check_files",
    "check_generate",
    "check_session",
    "check_step",
    "check_version",
    "ir_version_of",
    "model_names",
    "open_session",
    "parse_default",
    "parse_meta",
    "read_default",
    "read_meta",
    "sha256_bytes",
    "sha256_file",
    "verify_version_dir",
    "version_numbers",
    "write_default",
]

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
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

META_FILE = "model.json"
STEP_FILE = "model.onnx"  # one step: tokens (B,), state (B, S) -> logits (B, V), state_out (B, S)
SEQUENCE_FILE = "sequence.onnx"  # a Scan of the same step: tokens (B, T), state (B, S) -> (B, T, V), (B, S)
# K sampled steps in an ONNX Loop: state (B, S), logits (B, V), uniforms (B, K), temperature, top_k and
# top_p (B,) -> tokens (B, K), state_out (B, S), logits_out (B, V); sampling as server/sampling.py, in float32
GENERATE_FILE = "generate.onnx"
ONNX_FILES = (STEP_FILE, SEQUENCE_FILE)  # in every version
OPTIONAL_FILES = (GENERATE_FILE,)  # in a version whose model.json `files` lists them, checked like the others
CELLS = ("elman", "gru", "lstm")
INPUT_KINDS = ("tokens", "vector")  # model.json input.kind; absent means tokens
TASKS = {"tokens": ("lm",), "vector": ("classify", "forecast")}  # model.json task.kind per input kind
LABEL_MODES = ("sequence", "step")  # a classify task's labels: one per sequence (at its last step) or per step
FORECAST_OUTPUTS = (["mean", "log_var"], ["mean"])  # what a forecast's outputs hold, in this order
OPSET = 17  # what the exporter writes ...
IR_VERSION = 8  # ... and what onnxruntime 1.14 and later read
# (name, element type, rank) of every input and output, per file; the last axis of state/logits is
# checked against model.json (state_size, len(vocab)).
IO: dict[str, tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]] = {
    STEP_FILE: ([("tokens", "tensor(int64)", 1), ("state", "tensor(float)", 2)],
                [("logits", "tensor(float)", 2), ("state_out", "tensor(float)", 2)]),
    SEQUENCE_FILE: ([("tokens", "tensor(int64)", 2), ("state", "tensor(float)", 2)],
                    [("logits", "tensor(float)", 3), ("state_out", "tensor(float)", 2)]),
    GENERATE_FILE: ([("state", "tensor(float)", 2), ("logits", "tensor(float)", 2),
                     ("uniforms", "tensor(float)", 2), ("temperature", "tensor(float)", 1),
                     ("top_k", "tensor(int64)", 1), ("top_p", "tensor(float)", 1)],
                    [("tokens", "tensor(int64)", 2), ("state_out", "tensor(float)", 2),
                     ("logits_out", "tensor(float)", 2)]),
}
# The same for vector models (no generate.onnx); the last axes are checked against features, output_size
# and state_size.
VECTOR_IO: dict[str, tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]] = {
    STEP_FILE: ([("inputs", "tensor(float)", 2), ("state", "tensor(float)", 2)],
                [("outputs", "tensor(float)", 2), ("state_out", "tensor(float)", 2)]),
    SEQUENCE_FILE: ([("inputs", "tensor(float)", 3), ("state", "tensor(float)", 2)],
                    [("outputs", "tensor(float)", 3), ("state_out", "tensor(float)", 2)]),
}


class ModelFormatError(ValueError):
    """A version folder that breaks the contract: the message names the file and the problem."""


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _vocab(v: Any) -> str | None:
    if not (isinstance(v, list) and v and all(isinstance(c, str) and len(c) == 1 for c in v)):
        return "must be a non-empty list of 1-character strings"
    if len(set(v)) != len(v):
        return "has duplicate characters"
    return None


def _is(pred: Callable[[Any], bool], what: str) -> Callable[[Any], str | None]:
    return lambda v: None if pred(v) else what


# model.json, the one definition: key -> (check returning what is wrong or None, default when optional).
# A key without a default is required.
_REQUIRED = object()
SCHEMA: dict[str, tuple[Callable[[Any], str | None], Any]] = {
    "name": (_is(lambda v: isinstance(v, str) and bool(v), "must be a non-empty string"), _REQUIRED),
    "version": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "cell": (_is(lambda v: v in CELLS, f"must be one of {', '.join(CELLS)}"), _REQUIRED),
    "vocab": (_vocab, _REQUIRED),
    "hidden_size": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "state_size": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "layers": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "embed_size": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "initial_state": (_is(lambda v: isinstance(v, list) and all(map(_number, v)), "must be a list of numbers"),
                      _REQUIRED),
    "files": (_is(lambda v: isinstance(v, dict) and all(isinstance(v.get(f), str) for f in ONNX_FILES)
                  and all(isinstance(v[f], str) for f in OPTIONAL_FILES if f in v),
                  f"must give a sha256 for {' and '.join(ONNX_FILES)} (and for {', '.join(OPTIONAL_FILES)} "
                  "when listed)"), _REQUIRED),
    "opset": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "ir_version": (_is(_pos_int, "must be a positive integer"), _REQUIRED),
    "metrics": (_is(lambda v: isinstance(v, dict), "must be an object"), _REQUIRED),
    "source": (_is(lambda v: isinstance(v, dict), "must be an object"), _REQUIRED),
    "checks": (_is(lambda v: isinstance(v, dict), "must be an object"), {}),
    "input": (_is(lambda v: isinstance(v, dict) and v.get("kind") in INPUT_KINDS,
                  f"must be an object whose kind is one of {', '.join(INPUT_KINDS)}"), {"kind": "tokens"}),
    "task": (_is(lambda v: isinstance(v, dict) and isinstance(v.get("kind"), str), "must be an object with a kind"),
             {"kind": "lm"}),
}
REQUIRED_KEYS = tuple(k for k, (_, default) in SCHEMA.items() if default is _REQUIRED)  # of a token model
TOKEN_KEYS = ("vocab", "embed_size")  # token models only: a vector model must not have them
VECTOR_REQUIRED_KEYS = tuple(k for k in REQUIRED_KEYS if k not in TOKEN_KEYS) + ("input", "task")


def _finite_list(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_number(x) and math.isfinite(x) for x in v)


def _names(v: Any, n: int | None = None) -> bool:
    return (isinstance(v, list) and bool(v) and (n is None or len(v) == n) and len(set(v)) == len(v)
            and all(isinstance(x, str) and x for x in v))


def _input_problem(spec: dict) -> str | None:
    """What is wrong with a vector model's `input` object, or None."""
    f = spec.get("features")
    if not _pos_int(f):
        return f"input.features must be a positive integer, got {_short(f)}"
    for key in ("mean", "std"):
        if not _finite_list(spec.get(key), f):
            return f"input.{key} must be a list of {f} finite numbers (the normalisation), got {_short(spec.get(key))}"
    if not all(x > 0 for x in spec["std"]):
        return f"input.std must be positive, got {_short(spec['std'])}"
    if "names" in spec and not _names(spec["names"], f):
        return f"input.names must be {f} distinct non-empty strings, got {_short(spec['names'])}"
    return None


def _task_problem(kind: str, task: dict, features: int | None) -> str | None:
    """What is wrong with `task` for this input kind, or None."""
    tk = task["kind"]
    if tk not in TASKS[kind]:
        return f"task.kind {tk!r} does not fit input.kind {kind!r}: expected {' or '.join(TASKS[kind])}"
    if tk == "classify":
        if not _names(task.get("classes")) or len(task["classes"]) < 2:
            return f"task.classes must be 2 or more distinct non-empty strings, got {_short(task.get('classes'))}"
        if task.get("labels") not in LABEL_MODES:
            return f"task.labels must be one of {', '.join(LABEL_MODES)}, got {_short(task.get('labels'))}"
    elif tk == "forecast":
        if task.get("outputs") not in FORECAST_OUTPUTS:
            return f"task.outputs must be one of {FORECAST_OUTPUTS}, got {_short(task.get('outputs'))}"
        want = features * len(task["outputs"])
        if task.get("output_size") != want:
            return f"task.output_size must be {want} ({features} features x {task['outputs']}), " \
                   f"got {_short(task.get('output_size'))}"
        if "horizon" in task and not _pos_int(task["horizon"]):
            return f"task.horizon must be a positive integer, got {_short(task['horizon'])}"
    return None


@dataclass(frozen=True)
class ModelMeta:
    """model.json of one version, checked against SCHEMA; `raw` is the JSON object as written."""

    name: str
    version: int
    cell: str
    vocab: tuple[str, ...]  # () for a vector model
    hidden_size: int
    state_size: int
    layers: int
    embed_size: int | None  # None for a vector model
    initial_state: tuple[float, ...]
    files: Mapping[str, str]
    opset: int
    ir_version: int
    metrics: Mapping[str, Any]
    source: Mapping[str, Any]
    checks: Mapping[str, Any] = field(default_factory=dict)
    input_spec: Mapping[str, Any] = field(default_factory=lambda: {"kind": "tokens"})  # model.json `input`
    task_spec: Mapping[str, Any] = field(default_factory=lambda: {"kind": "lm"})  # model.json `task`
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __getitem__(self, key: str) -> Any:
        """model.json's value for `key`, as written (the JSON object's own types: lists, dicts)."""
        return self.raw[key]

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.vocab)

    @property
    def val_loss(self) -> float | None:
        """The validation loss the export measured (nats per token), if any."""
        v = self.metrics.get("val_loss")
        return float(v) if _number(v) else None

    @property
    def onnx_files(self) -> tuple[str, ...]:
        """The ONNX files this version holds: ONNX_FILES, then the OPTIONAL_FILES that `files` lists."""
        return ONNX_FILES + tuple(f for f in OPTIONAL_FILES if f in self.files)

    def initial_state_array(self) -> np.ndarray:
        """The initial state as a (S,) float32 array."""
        return np.asarray(self.initial_state, np.float32)

    @property
    def input_kind(self) -> str:
        """"tokens" (token ids in, the default) or "vector" (float frames in)."""
        return self.input_spec["kind"]

    @property
    def features(self) -> int | None:
        """Width F of a vector model's input frames; None for a token model."""
        return self.input_spec.get("features") if self.input_kind == "vector" else None

    @property
    def task(self) -> str:
        """"lm" (token models), "classify" or "forecast" (vector models)."""
        return self.task_spec["kind"]

    @property
    def classes(self) -> tuple[str, ...]:
        """A classifier's class names, in the order of its outputs; () for other tasks."""
        return tuple(self.task_spec["classes"]) if self.task == "classify" else ()

    @property
    def label_mode(self) -> str | None:
        """A classifier's labels: "sequence" (the answer is the last step's) or "step"; None otherwise."""
        return self.task_spec["labels"] if self.task == "classify" else None

    @property
    def forecast_outputs(self) -> tuple[str, ...]:
        """A forecaster's output blocks of F each, in order ("mean", then "log_var" if any); () otherwise."""
        return tuple(self.task_spec["outputs"]) if self.task == "forecast" else ()

    @property
    def output_size(self) -> int:
        """Last axis of the graphs' scores: len(vocab) (logits), len(classes) (logits) or F per forecast block."""
        if self.task == "lm":
            return self.vocab_size
        return len(self.classes) if self.task == "classify" else int(self.task_spec["output_size"])

    def normalization(self) -> tuple[np.ndarray, np.ndarray] | None:
        """A vector model's (mean, std), (F,) float32 each, as its graphs apply them; None for tokens."""
        if self.input_kind != "vector":
            return None
        return np.asarray(self.input_spec["mean"], np.float32), np.asarray(self.input_spec["std"], np.float32)

    @property
    def io(self) -> dict[str, tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]]:
        """The contract's inputs and outputs per file for this kind of model (IO or VECTOR_IO)."""
        return VECTOR_IO if self.input_kind == "vector" else IO


def parse_meta(obj: Any, where: str | Path = META_FILE, folder: Path | None = None) -> ModelMeta:
    """Check a model.json object against the schema (and its folder's name); errors name the key."""
    def bad(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise bad("is not a JSON object")
    vector = isinstance(obj.get("input"), dict) and obj["input"].get("kind") == "vector"
    missing = [k for k in (VECTOR_REQUIRED_KEYS if vector else REQUIRED_KEYS) if k not in obj]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    values = {}
    for key, (check, default) in SCHEMA.items():
        if vector and key in TOKEN_KEYS:
            if key in obj:
                raise bad(f"{key} is for token models, and input.kind is vector")
            continue
        v = obj.get(key, default)
        problem = check(v)
        if problem:
            raise bad(f"{key} {problem}, got {_short(v)}")
        values[key] = v
    if len(values["initial_state"]) != values["state_size"]:
        raise bad(f"initial_state has {len(values['initial_state'])} numbers, state_size is {values['state_size']}")
    if folder is not None and folder.name.isdigit() and values["version"] != int(folder.name):
        raise bad(f"version {values['version']} does not match its folder {folder.name}")
    kind, problem = values["input"]["kind"], None
    if vector:
        problem = _input_problem(values["input"])
        extra = [f for f in OPTIONAL_FILES if f in values["files"]]
        if extra:
            problem = problem or f"files lists {', '.join(extra)}, which vector models do not have"
    elif set(values["input"]) != {"kind"}:
        problem = f"input of kind tokens takes no other keys, got {_short(values['input'])}"
    problem = problem or _task_problem(kind, values["task"], values["input"].get("features"))
    if problem:
        raise bad(problem)
    values["vocab"] = tuple(values.get("vocab", ()))
    values["embed_size"] = values.get("embed_size")
    values["initial_state"] = tuple(float(x) for x in values["initial_state"])
    values["input_spec"], values["task_spec"] = values.pop("input"), values.pop("task")
    return ModelMeta(**values, raw=obj)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def read_meta(folder: str | Path) -> ModelMeta:
    """Read and check `<folder>/model.json` (no file checksums; see check_files)."""
    folder = Path(folder)
    mj = folder / META_FILE
    try:
        obj = json.loads(mj.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{mj}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{mj}: not valid JSON: {e}") from None
    except OSError as e:
        raise ModelFormatError(f"{mj}: unreadable: {e}") from None
    return parse_meta(obj, mj, folder)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            d.update(block)
    return d.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes (what model.json `files` records for a file with these bytes)."""
    return hashlib.sha256(data).hexdigest()


def ir_version_of(head: bytes) -> int | None:
    """The ir_version varint (field 1) that opens a serialized ModelProto, if it is there."""
    if not head or head[0] != 0x08:
        return None
    value, shift = 0, 0
    for byte in head[1:11]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return None


def check_files(folder: str | Path, meta: ModelMeta) -> None:
    """Every ONNX file (optional ones when listed) is present, matches its sha256, has model.json's IR version."""
    folder = Path(folder)
    for fname in meta.onnx_files:
        path = folder / fname
        if not path.is_file():
            raise ModelFormatError(f"{path}: missing")
        digest, want = sha256_file(path), meta.files[fname]
        if digest != want:
            raise ModelFormatError(f"{path}: sha256 {digest[:16]}... does not match model.json's {want[:16]}... "
                                   f"(the file is corrupt, truncated or replaced)")
        with open(path, "rb") as f:
            ir = ir_version_of(f.read(16))
        if ir != meta.ir_version:
            raise ModelFormatError(f"{path}: IR version {ir} is not model.json's {meta.ir_version}")


def check_version(folder: str | Path) -> ModelMeta:
    """model.json and file checksums: what `rnn-export list` and the server both require before loading."""
    meta = read_meta(folder)
    check_files(folder, meta)
    return meta


def check_session(sess: ort.InferenceSession, path: str | Path, meta: ModelMeta) -> None:
    """A loaded graph's inputs, outputs and metadata_props are what the contract and model.json promise."""
    want_in, want_out = meta.io[Path(path).name]
    last = {"state": meta.state_size, "state_out": meta.state_size, "logits": meta.vocab_size,
            "logits_out": meta.vocab_size, "inputs": meta.features, "outputs": meta.output_size}
    for kind, args, want_args in (("input", sess.get_inputs(), want_in), ("output", sess.get_outputs(), want_out)):
        got = [(a.name, a.type, len(a.shape)) for a in args]
        if got != want_args:
            raise ModelFormatError(f"{path}: {kind}s {got} break the contract, expected {want_args}")
        for a in args:
            if a.name in last and a.shape[-1] != last[a.name]:
                raise ModelFormatError(f"{path}: {kind} {a.name} has last axis {a.shape[-1]}, "
                                       f"model.json implies {last[a.name]}")
    props = sess.get_modelmeta().custom_metadata_map
    for key, want in ((("vocab", list(meta.vocab)),) if meta.input_kind == "tokens" else
                      (("input", meta.input_spec), ("task", meta.task_spec))):
        try:
            got = json.loads(props.get(key, "null"))
        except json.JSONDecodeError:
            got = None
        if got != want:
            raise ModelFormatError(f"{path}: metadata_props {key} does not match model.json")
    if props.get("cell") != meta.cell:
        raise ModelFormatError(f"{path}: metadata_props cell {props.get('cell')!r} is not model.json's {meta.cell!r}")


def open_session(model: bytes | str | Path, options: ort.SessionOptions | None = None,
                 providers: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session (default: one CPU thread); ModelFormatError when the graph does not load."""
    if options is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
    data = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(data, options, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises several types for an unreadable graph
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = model if isinstance(model, (str, Path)) else "graph"
        raise ModelFormatError(f"{where}: onnxruntime cannot load it: {first}") from None


def check_step(step: ort.InferenceSession, path: str | Path, meta: ModelMeta) -> None:
    """One step from the initial state runs and returns (1, V) logits and a (1, S) state (vector models:
    the mean frame in, (1, O) finite outputs)."""
    state = meta.initial_state_array()[None]  # (1, S)
    if meta.input_kind == "vector":
        frame = meta.normalization()[0][None]  # (1, F): raw values at the training mean
        try:
            outputs, state_out = step.run(["outputs", "state_out"], {"inputs": frame, "state": state})
        except Exception as e:  # noqa: BLE001 -- a graph that loads but cannot run
            raise ModelFormatError(f"{path}: a step from the initial state fails: {e}") from None
        if outputs.shape != (1, meta.output_size) or state_out.shape != state.shape:
            raise ModelFormatError(f"{path}: a step returned shapes {outputs.shape}, {state_out.shape}")
        if not (np.isfinite(outputs).all() and np.isfinite(state_out).all()):
            raise ModelFormatError(f"{path}: a step from the initial state returned NaN or infinite values")
        return
    try:
        logits, state_out = step.run(["logits", "state_out"], {"tokens": np.zeros(1, np.int64), "state": state})
    except Exception as e:  # noqa: BLE001 -- a graph that loads but cannot run
        raise ModelFormatError(f"{path}: a step from the initial state fails: {e}") from None
    if logits.shape != (1, meta.vocab_size) or state_out.shape != state.shape:
        raise ModelFormatError(f"{path}: a step returned shapes {logits.shape}, {state_out.shape}")


def check_generate(gen: ort.InferenceSession, step: ort.InferenceSession, path: str | Path,
                   meta: ModelMeta) -> None:
    """One greedy generated token from the initial state runs and agrees with model.onnx (argmax, a step)."""
    feeds = {"tokens": np.zeros(1, np.int64), "state": meta.initial_state_array()[None]}
    logits, state = step.run(["logits", "state_out"], feeds)  # (1, V), (1, S)
    feeds = {"state": state, "logits": logits, "uniforms": np.zeros((1, 1), np.float32),
             "temperature": np.zeros(1, np.float32), "top_k": np.zeros(1, np.int64),
             "top_p": np.zeros(1, np.float32)}
    try:
        tokens, state_out, logits_out = gen.run(["tokens", "state_out", "logits_out"], feeds)
    except Exception as e:  # noqa: BLE001 -- a graph that loads but cannot run
        raise ModelFormatError(f"{path}: one generated token from the initial state fails: {e}") from None
    if tokens.shape != (1, 1) or state_out.shape != state.shape or logits_out.shape != logits.shape:
        raise ModelFormatError(f"{path}: generation returned shapes {tokens.shape}, {state_out.shape}, "
                               f"{logits_out.shape}")
    want = np.argmax(logits, axis=1)  # (1,)
    if tokens[0, 0] != want[0]:
        raise ModelFormatError(f"{path}: greedy token {tokens[0, 0]} is not model.onnx's argmax {want[0]}")
    w_logits, w_state = step.run(["logits", "state_out"], {"tokens": want, "state": state})
    tol = 1e-4 * max(1.0, float(np.abs(w_logits).max()))
    diff = max(float(np.abs(logits_out - w_logits).max()), float(np.abs(state_out - w_state).max()))
    if not diff <= tol:
        raise ModelFormatError(f"{path}: its step differs from model.onnx's by {diff:.3g} (> {tol:.3g})")


def verify_version_dir(path: str | Path) -> ModelMeta:
    """Check a version folder as the server loads it (schema, checksums, graphs, one step), or raise."""
    folder = Path(path)
    meta = check_version(folder)
    sessions = {}
    for fname in meta.onnx_files:
        sessions[fname] = open_session(folder / fname)
        check_session(sessions[fname], folder / fname, meta)
    check_step(sessions[STEP_FILE], folder / STEP_FILE, meta)
    if GENERATE_FILE in sessions:
        check_generate(sessions[GENERATE_FILE], sessions[STEP_FILE], folder / GENERATE_FILE, meta)
    return meta


def version_numbers(name_dir: str | Path) -> list[int]:
    """Published versions of one model (positive integer folder names), ascending."""
    name_dir = Path(name_dir)
    if not name_dir.is_dir():
        return []
    return sorted(int(p.name) for p in name_dir.iterdir() if p.name.isdigit() and int(p.name) > 0 and p.is_dir())


def model_names(root: str | Path) -> list[str]:
    """Model folders of a repository (hidden ones, such as an exporter's temporaries, excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# ==================================================================================================
# The default pointer: which version new sessions get (written by rnn-export, read by the server).
#
# `<root>/<name>/default.json` = {"version": N, "reason": "why N is the default", "at": "ISO time"}
# ("reason" and "at" optional). When the file is absent the default is the model's highest serveable
# version, so repositories from before the pointer keep working. The server loads the pointer's version
# beside its --serve-versions window; a pointer that does not parse, or names a version that is not
# serveable, is logged and the default falls back to the highest version (never a crash). The file is
# replaced in one rename, so a reader sees the old pointer or the new one, never half of one.
# ==================================================================================================
DEFAULT_FILE = "default.json"
DEFAULT_KEYS = ("version", "reason", "at")


@dataclass(frozen=True)
class DefaultPointer:
    """A model's default.json: the version new sessions get and why."""

    version: int
    reason: str = ""
    at: str = ""  # when it was written (ISO 8601), "" if not said

    def to_json(self) -> dict[str, Any]:
        """The file's object (empty fields left out)."""
        out: dict[str, Any] = {"version": self.version}
        if self.reason:
            out["reason"] = self.reason
        if self.at:
            out["at"] = self.at
        return out


def parse_default(obj: Any, where: str | Path = DEFAULT_FILE) -> DefaultPointer:
    """Check a default.json object; ModelFormatError naming the file and the problem."""
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{where}: must be a JSON object such as {{\"version\": 1}}")
    unknown = sorted(set(obj) - set(DEFAULT_KEYS))
    if unknown:
        raise ModelFormatError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_KEYS)})")
    if not _pos_int(obj.get("version")):
        raise ModelFormatError(f"{where}: version must be a positive integer, got {_short(obj.get('version'))}")
    for key in ("reason", "at"):
        if not isinstance(obj.get(key, ""), str):
            raise ModelFormatError(f"{where}: {key} must be a string, got {_short(obj[key])}")
    return DefaultPointer(obj["version"], obj.get("reason", ""), obj.get("at", ""))


def read_default(name_dir: str | Path) -> DefaultPointer | None:
    """A model folder's default pointer, None when it has none; ModelFormatError when it is broken."""
    path = Path(name_dir) / DEFAULT_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: unreadable: {e}") from None
    return parse_default(obj, path)


def write_default(name_dir: str | Path, pointer: DefaultPointer) -> Path:
    """Write a model's default.json atomically (temp file, fsync, rename); returns its path."""
    import os

    name_dir = Path(name_dir)
    parse_default(pointer.to_json(), name_dir / DEFAULT_FILE)  # never write what a reader would refuse
    path = name_dir / DEFAULT_FILE
    tmp = name_dir / f".{DEFAULT_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(pointer.to_json(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

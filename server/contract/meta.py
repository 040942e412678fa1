"""The contract's names and model.json: file names, the input/output tables, the schema, ModelMeta."""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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

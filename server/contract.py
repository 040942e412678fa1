"""The ONNX contract, the one seam between trainer and server: what a version folder holds and how it is checked.

A model repository is `<root>/<name>/<version>/` holding `model.json` and the ONNX graphs named in
`ONNX_FILES`, plus those of `OPTIONAL_FILES` that model.json's `files` lists (`ModelMeta.onnx_files`).
This module is torch-free (json, numpy, onnxruntime), so the server imports it and the exporter imports
it from here: one schema of `model.json`, one checksum, one set of graph checks, and
so one answer to "is this version usable" for `rnn-serve`, `rnn-export` and `rnn-export list`.
"""
from __future__ import annotations

import hashlib
import json
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
}
REQUIRED_KEYS = tuple(k for k, (_, default) in SCHEMA.items() if default is _REQUIRED)


@dataclass(frozen=True)
class ModelMeta:
    """model.json of one version, checked against SCHEMA; `raw` is the JSON object as written."""

    name: str
    version: int
    cell: str
    vocab: tuple[str, ...]
    hidden_size: int
    state_size: int
    layers: int
    embed_size: int
    initial_state: tuple[float, ...]
    files: Mapping[str, str]
    opset: int
    ir_version: int
    metrics: Mapping[str, Any]
    source: Mapping[str, Any]
    checks: Mapping[str, Any] = field(default_factory=dict)
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


def parse_meta(obj: Any, where: str | Path = META_FILE, folder: Path | None = None) -> ModelMeta:
    """Check a model.json object against the schema (and its folder's name); errors name the key."""
    def bad(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{where}: {msg}")

    if not isinstance(obj, dict):
        raise bad("is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    values = {}
    for key, (check, default) in SCHEMA.items():
        v = obj.get(key, default)
        problem = check(v)
        if problem:
            raise bad(f"{key} {problem}, got {_short(v)}")
        values[key] = v
    if len(values["initial_state"]) != values["state_size"]:
        raise bad(f"initial_state has {len(values['initial_state'])} numbers, state_size is {values['state_size']}")
    if folder is not None and folder.name.isdigit() and values["version"] != int(folder.name):
        raise bad(f"version {values['version']} does not match its folder {folder.name}")
    values["vocab"] = tuple(values["vocab"])
    values["initial_state"] = tuple(float(x) for x in values["initial_state"])
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
    want_in, want_out = IO[Path(path).name]
    last = {"state": meta.state_size, "state_out": meta.state_size, "logits": meta.vocab_size,
            "logits_out": meta.vocab_size}
    for kind, args, want_args in (("input", sess.get_inputs(), want_in), ("output", sess.get_outputs(), want_out)):
        got = [(a.name, a.type, len(a.shape)) for a in args]
        if got != want_args:
            raise ModelFormatError(f"{path}: {kind}s {got} break the contract, expected {want_args}")
        for a in args:
            if a.name in last and a.shape[-1] != last[a.name]:
                raise ModelFormatError(f"{path}: {kind} {a.name} has last axis {a.shape[-1]}, "
                                       f"model.json implies {last[a.name]}")
    props = sess.get_modelmeta().custom_metadata_map
    try:
        file_vocab = json.loads(props.get("vocab", "null"))
    except json.JSONDecodeError:
        file_vocab = None
    if file_vocab != list(meta.vocab):
        raise ModelFormatError(f"{path}: metadata_props vocab does not match model.json")
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
    """One step from the initial state runs and returns (1, V) logits and a (1, S) state."""
    state = meta.initial_state_array()[None]  # (1, S)
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

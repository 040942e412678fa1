"""Checks of a version folder against the contract: checksums, IR version, graphs' inputs and outputs, one step."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .meta import (
    GENERATE_FILE,
    STEP_FILE,
    ModelFormatError,
    ModelMeta,
    read_meta,
)


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

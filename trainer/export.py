"""rnn-export: publish a model as models/<name>/<version>/ (model.onnx, sequence.onnx, model.json).

Every export checks itself and writes nothing when a check fails: onnx.checker, onnxruntime step vs
PyTorch (<= 1e-5), sequence.onnx vs a loop of model.onnx over 256 steps and vs PyTorch (<= 1e-4),
then the written folder is verified as the server would read it. Writes go to a `.tmp-*` folder
inside the repository and are published with one rename, which also allocates the version number
without clashes between concurrent exporters.

This module's top level imports no torch and no onnx: `verify_version_dir` and `ModelFormatError`
are the torch-free checks a server can share. Torch and the graph builder are imported lazily.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

if TYPE_CHECKING:
    from trainer.model import RNNModel

log = logging.getLogger(__name__)

ONNX_FILES = ("model.onnx", "sequence.onnx")
CELLS = ("elman", "gru", "lstm")
REQUIRED_KEYS = ("name", "version", "cell", "vocab", "hidden_size", "state_size", "layers", "embed_size",
                 "initial_state", "metrics", "files", "opset", "ir_version", "source")
TMP_PREFIX = ".tmp-"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STEP_TOL, SEQ_TOL = 1e-5, 1e-4
# (input/output name, dtype, rank) per file; the last axis of state/logits is checked against model.json.
IO = {"model.onnx": ([("tokens", "tensor(int64)", 1), ("state", "tensor(float)", 2)],
                     [("logits", "tensor(float)", 2), ("state_out", "tensor(float)", 2)]),
      "sequence.onnx": ([("tokens", "tensor(int64)", 2), ("state", "tensor(float)", 2)],
                        [("logits", "tensor(float)", 3), ("state_out", "tensor(float)", 2)])}


class ModelFormatError(ValueError):
    """A version folder that breaks the ONNX contract: the message names the file and the problem."""


class ExportError(ValueError):
    """An export refused (bad input or a failed check); nothing was written."""


def ort_session(model: bytes | str | Path) -> ort.InferenceSession:
    """A single-threaded CPU onnxruntime session (small graphs; threads only add contention)."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    data = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            d.update(block)
    return d.hexdigest()


def _pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_meta(meta: Any, mj: Path, folder: Path) -> None:
    """model.json's keys and types, with errors naming the key."""
    def bad(msg: str) -> ModelFormatError:
        return ModelFormatError(f"{mj}: {msg}")

    if not isinstance(meta, dict):
        raise bad("is not a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    if meta["cell"] not in CELLS:
        raise bad(f"cell {meta['cell']!r} is not one of {', '.join(CELLS)}")
    vocab = meta["vocab"]
    if not (isinstance(vocab, list) and vocab and all(isinstance(c, str) and len(c) == 1 for c in vocab)):
        raise bad("vocab must be a non-empty list of 1-character strings")
    if len(set(vocab)) != len(vocab):
        raise bad("vocab has duplicate characters")
    for key in ("version", "hidden_size", "state_size", "layers", "embed_size"):
        if not _pos_int(meta[key]):
            raise bad(f"{key} must be a positive integer, got {meta[key]!r}")
    if folder.name.isdigit() and meta["version"] != int(folder.name):
        raise bad(f"version {meta['version']} does not match its folder {folder.name}")
    init = meta["initial_state"]
    if not (isinstance(init, list) and len(init) == meta["state_size"]
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in init)):
        raise bad(f"initial_state must be a list of {meta['state_size']} numbers")
    files = meta["files"]
    if not (isinstance(files, dict) and all(isinstance(files.get(f), str) for f in ONNX_FILES)):
        raise bad(f"files must give a sha256 for {' and '.join(ONNX_FILES)}")


def _ir_version(head: bytes) -> int | None:
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


def _check_file(path: Path, meta: dict[str, Any]) -> ort.InferenceSession:
    """One ONNX file: checksum, IR version, loads in onnxruntime, inputs/outputs and metadata as promised."""
    if not path.is_file():
        raise ModelFormatError(f"{path}: missing")
    digest, want = sha256_file(path), meta["files"][path.name]
    if digest != want:
        raise ModelFormatError(f"{path}: sha256 {digest[:16]}... does not match model.json's {want[:16]}... "
                               f"(the file is corrupt, truncated or replaced)")
    with open(path, "rb") as f:
        ir = _ir_version(f.read(16))
    if ir != meta["ir_version"]:
        raise ModelFormatError(f"{path}: IR version {ir} is not model.json's {meta['ir_version']}")
    try:
        sess = ort_session(path)
    except Exception as e:  # noqa: BLE001 -- onnxruntime raises several types for an unreadable graph
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFormatError(f"{path}: onnxruntime cannot load it: {first}") from None
    want_in, want_out = IO[path.name]
    for kind, args, want_args in (("input", sess.get_inputs(), want_in), ("output", sess.get_outputs(), want_out)):
        got = [(a.name, a.type, len(a.shape)) for a in args]
        if got != want_args:
            raise ModelFormatError(f"{path}: {kind}s {got} break the contract, expected {want_args}")
        for a in args:
            last = {"state": meta["state_size"], "state_out": meta["state_size"], "logits": len(meta["vocab"])}
            if a.name in last and a.shape[-1] != last[a.name]:
                raise ModelFormatError(f"{path}: {kind} {a.name} has last axis {a.shape[-1]}, "
                                       f"model.json implies {last[a.name]}")
    props = sess.get_modelmeta().custom_metadata_map
    try:
        file_vocab = json.loads(props.get("vocab", "null"))
    except json.JSONDecodeError:
        file_vocab = None
    if file_vocab != meta["vocab"]:
        raise ModelFormatError(f"{path}: metadata_props vocab does not match model.json")
    if props.get("cell") != meta["cell"]:
        raise ModelFormatError(f"{path}: metadata_props cell {props.get('cell')!r} is not model.json's "
                               f"{meta['cell']!r}")
    return sess


def verify_version_dir(path: str | Path) -> dict[str, Any]:
    """Check a version folder as a server would load it; return its model.json or raise ModelFormatError."""
    folder = Path(path)
    mj = folder / "model.json"
    if not mj.is_file():
        raise ModelFormatError(f"{mj}: missing")
    try:
        meta = json.loads(mj.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{mj}: not valid JSON: {e}") from None
    _check_meta(meta, mj, folder)
    step = _check_file(folder / "model.onnx", meta)
    _check_file(folder / "sequence.onnx", meta)
    state = np.asarray([meta["initial_state"]], dtype=np.float32)  # (1, S)
    try:
        logits, state_out = step.run(None, {"tokens": np.zeros(1, np.int64), "state": state})
    except Exception as e:  # noqa: BLE001 -- a graph that loads but cannot run
        raise ModelFormatError(f"{folder / 'model.onnx'}: a step from the initial state fails: {e}") from None
    if logits.shape != (1, len(meta["vocab"])) or state_out.shape != state.shape:
        raise ModelFormatError(f"{folder / 'model.onnx'}: a step returned shapes {logits.shape}, "
                               f"{state_out.shape}")
    return meta


def version_numbers(name_dir: Path) -> list[int]:
    """Published versions of one model (positive integer folder names), ascending."""
    if not name_dir.is_dir():
        return []
    return sorted(int(p.name) for p in name_dir.iterdir() if p.name.isdigit() and int(p.name) > 0 and p.is_dir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(name_dir: Path, max_age_s: float = 86400.0) -> list[Path]:
    """Remove `.tmp-*` folders left by exporters that died (their pid is gone here, or a day old)."""
    removed, host = [], socket.gethostname()
    if not name_dir.is_dir():
        return removed
    for p in name_dir.iterdir():
        if not p.name.startswith(TMP_PREFIX):
            continue
        parts = p.name[len(TMP_PREFIX):].rsplit("-", 2)  # host-pid-hex
        try:
            age = time.time() - p.stat().st_mtime
        except FileNotFoundError:
            continue
        dead = len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _pid_alive(int(parts[1]))
        if dead or age > max_age_s:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _write(path: Path, data: bytes) -> None:
    """Write and fsync, so a published folder's files are on disk before its rename."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, name_dir: Path, meta: dict[str, Any], version: int | None) -> Path:
    """Rename tmp to the next free version (or the given one); a lost race moves on to the next number."""
    v = version if version is not None else (version_numbers(name_dir) or [0])[-1] + 1
    while True:
        meta["version"] = v
        _write(tmp / "model.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        final = name_dir / str(v)
        try:
            if final.exists():
                raise FileExistsError(errno.EEXIST, "exists", str(final))
            os.rename(tmp, final)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if version is not None:
                raise ExportError(f"{final} already exists; versions are never overwritten") from None
            v += 1
            continue
        fd = os.open(name_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final


def _check_inputs(model: RNNModel, vocab: list[str], name: str, version: int | None) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ExportError(f"model name {name!r} must match {NAME_RE.pattern} (letters, digits, . _ -)")
    if version is not None and not _pos_int(version):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    if len(vocab) != model.config.vocab_size or not all(isinstance(c, str) and len(c) == 1 for c in vocab):
        raise ExportError(f"vocab must be {model.config.vocab_size} 1-character strings, got {len(vocab)} entries")
    if len(set(vocab)) != len(vocab):
        raise ExportError("vocab has duplicate characters")
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise ExportError(f"weight {key} holds NaN or infinite values")


def export_model(model: RNNModel, vocab: list[str], repo: str | Path, name: str, version: int | None = None,
                 metrics: dict[str, Any] | None = None, eval_text: str | None = None,
                 source: dict[str, Any] | None = None, *, step_tol: float = STEP_TOL,
                 seq_tol: float = SEQ_TOL) -> Path:
    """Check and publish one model as <repo>/<name>/<version>/; returns that folder, writes nothing on failure."""
    import onnx

    from trainer import onnx_graph as og

    vocab = list(vocab)
    if any(p.device.type != "cpu" for p in model.parameters()):
        import copy

        model = copy.deepcopy(model).cpu()  # the checks compare against onnxruntime on the CPU
    _check_inputs(model, vocab, name, version)
    t0 = time.perf_counter()
    protos = {"model.onnx": og.build_step(model, vocab), "sequence.onnx": og.build_sequence(model, vocab)}
    for fname, proto in protos.items():
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{name}: onnx.checker rejects {fname}: {e}") from None
    blobs = {f: p.SerializeToString() for f, p in protos.items()}
    step, seq = ort_session(blobs["model.onnx"]), ort_session(blobs["sequence.onnx"])
    checks = og.parity(model, step, seq)
    # sequence vs torch over 256 steps: the two float32 implementations differ by rounding that scales
    # with the logits (about 1e-4 at |logits| ~ 20, H=512), so that limit is relative to their scale
    limits = {"step": step_tol, "sequence_vs_step": seq_tol, "sequence_vs_torch": seq_tol * checks["logit_scale"]}
    failed = [f"{k} max abs diff {checks[k]:.3g} > {limits[k]:.3g}" for k in limits if not checks[k] <= limits[k]]
    if failed:
        raise ExportError(f"{name}: parity check failed: {'; '.join(failed)}")
    initial = [float(x) for x in model.h0.detach().cpu().float().numpy()]
    out_metrics: dict[str, Any] = {"val_loss": None, "steps": 0, "tokens": 0, "wall_time_s": 0.0, **(metrics or {})}
    if eval_text is not None:
        if out_metrics.get("val_loss") is not None:
            out_metrics["val_loss_torch"] = out_metrics["val_loss"]
        out_metrics["val_loss"] = og.onnx_val_loss(seq, eval_text, vocab, np.asarray(initial))
    c = model.config
    meta = {"name": name, "version": version or 1, "cell": c.cell, "vocab": vocab, "hidden_size": c.hidden_size,
            "state_size": model.state_size, "layers": c.layers, "embed_size": c.embed_size,
            "initial_state": initial, "metrics": out_metrics,
            "files": {f: hashlib.sha256(b).hexdigest() for f, b in blobs.items()},
            "opset": og.OPSET, "ir_version": og.IR_VERSION,
            "source": {"checkpoint_sha256": None, **(source or {}), "content_sha256": og.content_hash(model, vocab),
                       "exporter": og.FORMAT},
            "checks": {k: float(v) for k, v in checks.items()}}
    name_dir = Path(repo) / name
    name_dir.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(name_dir)
    tmp = name_dir / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for fname, data in blobs.items():
            _write(tmp / fname, data)
        _write(tmp / "model.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            verify_version_dir(tmp)
        except ModelFormatError as e:
            raise ExportError(f"{name}: the written files fail verification: {e}") from None
        final = _publish(tmp, name_dir, meta, version)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s in %.2fs (checks %s)", final, time.perf_counter() - t0, checks)
    return final


def export_checkpoint(ckpt_path: str | Path, repo: str | Path, name: str, version: int | None = None,
                      eval_text: str | None = None, *, step_tol: float = STEP_TOL,
                      seq_tol: float = SEQ_TOL) -> Path:
    """Export a trainer checkpoint (trainer.checkpoint format), recording its sha256 and metrics."""
    from trainer import checkpoint

    loaded = checkpoint.load(ckpt_path)
    source = {"checkpoint": str(Path(ckpt_path).resolve()), "checkpoint_sha256": sha256_file(ckpt_path)}
    return export_model(loaded.model, loaded.vocab, repo, name, version, metrics=loaded.metrics,
                        eval_text=eval_text, source=source, step_tol=step_tol, seq_tol=seq_tol)


def default_name(ckpt: str | Path) -> str:
    """A model name from a checkpoint path: its stem, or its folder's name for ckpt.pt-like files."""
    p = Path(ckpt)
    stem = p.stem
    return p.resolve().parent.name if stem in ("ckpt", "checkpoint", "model", "last", "best") else stem


def build_parser() -> argparse.ArgumentParser:
    """Flags of the single export; `rnn-export batch -h` and `rnn-export list -h` have their own."""
    p = argparse.ArgumentParser(prog="rnn-export", description=__doc__.split("\n")[0],
                                epilog="Also: rnn-export batch CHECKPOINT... | rnn-export list REPO")
    p.add_argument("checkpoint", help="checkpoint file written by rnn-train")
    p.add_argument("--repo", default="models", help="model repository folder (default: models)")
    p.add_argument("--name", help="model name (default: the checkpoint's stem, or its folder for ckpt.pt)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--eval-corpus", help="UTF-8 corpus: record onnxruntime's loss on its last 10%% as val_loss")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console script: single export, or dispatch to `batch` / `list`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("batch", "list"):
        from trainer import batch_export

        return batch_export.main_batch(argv[1:]) if argv[0] == "batch" else batch_export.main_list(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        text = None
        if args.eval_corpus:
            from trainer.data import load_text

            text = load_text(args.eval_corpus)
        if not Path(args.checkpoint).is_file():  # before importing torch: a typo answers at once
            raise ExportError(f"checkpoint {args.checkpoint} does not exist or is not a file")
        name = args.name or default_name(args.checkpoint)
        path = export_checkpoint(args.checkpoint, args.repo, name, args.version, eval_text=text)
    except (ValueError, OSError) as e:  # ExportError, CheckpointError, CorpusError, ModelFormatError, I/O
        print(f"rnn-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnn-export: interrupted; nothing was published", file=sys.stderr)
        return 130
    meta = json.loads((path / "model.json").read_text(encoding="utf-8"))
    print(json.dumps({"path": str(path), "name": meta["name"], "version": meta["version"],
                      "val_loss": meta["metrics"]["val_loss"], "checks": meta["checks"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained model: build its ONNX graphs, check them, publish models/<name>/<version>/.

Every export checks itself and writes nothing when a check fails: onnx.checker, onnxruntime step vs
PyTorch (<= 1e-5), sequence.onnx vs a loop of model.onnx over 256 steps and vs PyTorch (<= 1e-4),
generate.onnx vs a loop of model.onnx (64 greedy tokens and states bitwise; sampled tokens with fixed
uniforms equal to server.sampling's but where a uniform lies within 1e-5 of a CDF boundary), then the
written folder is verified as the server reads it (rnnserve.server.contract). Publishing is
one atomic rename (trainer.publish). The command line is trainer.export_cli.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..server.contract import (
    GENERATE_FILE,
    IR_VERSION,
    OPSET,
    SEQUENCE_FILE,
    STEP_FILE,
    open_session,
    sha256_bytes,
    sha256_file,
)
from . import checkpoint
from . import gen_graph as gg
from . import onnx_graph as og
from .model import RNNModel
from .publish import ExportError, FlagMismatch, check_name, write_version

log = logging.getLogger(__name__)

STEP_TOL, SEQ_TOL = 1e-5, 1e-4


def _check_inputs(model: RNNModel, vocab: list[str], name: str, version: int | None) -> None:
    check_name(name)
    if version is not None and not (isinstance(version, int) and not isinstance(version, bool) and version > 0):
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
    vocab = list(vocab)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()  # the checks compare against onnxruntime on the CPU
    _check_inputs(model, vocab, name, version)
    t0 = time.perf_counter()
    protos = {STEP_FILE: og.build_step(model, vocab), SEQUENCE_FILE: og.build_sequence(model, vocab)}
    protos[GENERATE_FILE] = gg.generate_from_step(protos[STEP_FILE])  # = gg.build_generate(model, vocab)
    blobs = og.checked_blobs(name, protos)
    step, seq = open_session(blobs[STEP_FILE]), open_session(blobs[SEQUENCE_FILE])
    checks = og.parity(model, step, seq)
    # sequence vs torch over 256 steps: the two float32 implementations differ by rounding that scales
    # with the logits (about 1e-4 at |logits| ~ 20, H=512), so that limit is relative to their scale
    limits = {"step": step_tol, "sequence_vs_step": seq_tol, "sequence_vs_torch": seq_tol * checks["logit_scale"]}
    failed = [f"{k} max abs diff {checks[k]:.3g} > {limits[k]:.3g}" for k in limits if not checks[k] <= limits[k]]
    initial = [float(x) for x in model.h0.detach().cpu().float().numpy()]
    gen = open_session(blobs[GENERATE_FILE])
    gen_checks = gg.generate_parity(step, gen, np.asarray(initial, np.float32))  # K=64 greedy and sampled
    failed += gg.parity_failures(gen_checks)
    if failed:
        raise ExportError(f"{name}: parity check failed: {'; '.join(failed)}")
    checks.update({f"generate_{k}": v for k, v in gen_checks.items()})
    out_metrics: dict[str, Any] = {"val_loss": None, "steps": 0, "tokens": 0, "wall_time_s": 0.0, **(metrics or {})}
    if eval_text is not None:
        if out_metrics.get("val_loss") is not None:
            out_metrics["val_loss_torch"] = out_metrics["val_loss"]
        out_metrics["val_loss"] = og.onnx_val_loss(seq, eval_text, vocab, np.asarray(initial))
    c = model.config
    meta = {"name": name, "version": version or 1, "cell": c.cell, "vocab": vocab, "hidden_size": c.hidden_size,
            "state_size": model.state_size, "layers": c.layers, "embed_size": c.embed_size,
            "initial_state": initial, "metrics": out_metrics,
            "files": {f: sha256_bytes(b) for f, b in blobs.items()},
            "opset": OPSET, "ir_version": IR_VERSION,
            "source": {"checkpoint_sha256": None, **(source or {}), "content_sha256": og.content_hash(model, vocab),
                       "exporter": og.FORMAT},
            "checks": {k: float(v) for k, v in checks.items()}}
    final = write_version(Path(repo) / name, blobs, meta, version)
    log.info("exported %s in %.2fs (checks %s)", final, time.perf_counter() - t0, checks)
    return final


def export_checkpoint(ckpt_path: str | Path, repo: str | Path, name: str, version: int | None = None,
                      eval_text: str | None = None, *, step_tol: float = STEP_TOL,
                      seq_tol: float = SEQ_TOL, eval_series: str | Path | None = None) -> Path:
    """Export a trainer checkpoint (trainer.checkpoint format), recording its sha256 and metrics.

    A sequence model's checkpoint goes to trainer.series_export; `eval_series` (a .csv or .npz in the
    trainer.series layout) is then measured in onnxruntime, as `eval_text` is for a text model.
    """
    loaded = checkpoint.load(ckpt_path)
    source = {"checkpoint": str(Path(ckpt_path).resolve()), "checkpoint_sha256": sha256_file(ckpt_path)}
    if loaded.is_series:
        if eval_text is not None:
            raise FlagMismatch(f"{ckpt_path} is a sequence model: evaluate it with --eval-series, not "
                               "--eval-corpus")
        from .series import load_series
        from .series_export import export_series_model

        info, data = loaded.series, None
        if eval_series is not None:
            labels = info.get("labels") if loaded.config.task == "classify" else None
            data = load_series(eval_series, labels, info.get("features"), tuple(info.get("classes") or ()) or None)
            source["eval_series"], source["eval_series_sha256"] = str(eval_series), sha256_file(eval_series)
        return export_series_model(loaded.model, info, repo, name, version, metrics=loaded.metrics, source=source,
                                   eval_set=data)
    if eval_series is not None:
        raise FlagMismatch(f"{ckpt_path} is a text model: evaluate it with --eval-corpus, not --eval-series")
    return export_model(loaded.model, loaded.vocab, repo, name, version, metrics=loaded.metrics,
                        eval_text=eval_text, source=source, step_tol=step_tol, seq_tol=seq_tol)


def default_name(ckpt: str | Path) -> str:
    """A model name from a checkpoint path: its stem, or its folder's name for ckpt.pt-like files."""
    p = Path(ckpt)
    stem = p.stem
    return p.resolve().parent.name if stem in ("ckpt", "checkpoint", "model", "last", "best") else stem

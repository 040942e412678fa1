"""Export a sequence model (rnn-train --series): vector graphs, parity checks, model.json, atomic publish.

The same discipline as trainer.export: onnx.checker, onnxruntime step vs PyTorch, sequence.onnx vs a
loop of model.onnx and vs PyTorch (limits relative to the outputs' scale, which is in raw units for a
forecaster), then the written folder is verified as the server reads it and published by one rename.
With an evaluation set, onnxruntime re-measures the model on it (`onnx_metrics`) and model.json records
that as `metrics.test_*` (PyTorch's own figures, if the checkpoint had them, as `test_*_torch`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..server.contract import (
    IR_VERSION,
    OPSET,
    SEQUENCE_FILE,
    STEP_FILE,
    open_session,
    sha256_bytes,
)
from . import onnx_graph as og
from . import series_graph as sg
from .model import SeriesModel
from .onnx_graph import FORMAT
from .publish import ExportError, check_name, write_version
from .series import SeriesSet

log = logging.getLogger(__name__)

STEP_TOL, SEQ_TOL = 1e-5, 1e-4  # times max(1, max |outputs|)


def _softmax_nll(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy (nats) of logits (N, C) against class ids (N,), in float64."""
    z = logits.astype(np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def onnx_metrics(step: ort.InferenceSession, seq: ort.InferenceSession, data: SeriesSet, meta: dict[str, Any],
                 initial_state: np.ndarray, horizon: int = 0) -> dict[str, float]:
    """Accuracy and cross-entropy (classify) or one-step RMSE and an H-step rollout RMSE in raw units
    (forecast) of the graphs on `data`, each sequence alone from the initial state, as a server would run it."""
    task, F = meta["task"], meta["input"]["features"]
    nll, correct, count, sq, frames, r_sq, r_n = 0.0, 0, 0, 0.0, 0, 0.0, 0
    for i, x in enumerate(data.seqs):
        state = initial_state[None]  # (1, S)
        out, _ = seq.run(None, {"inputs": x[None], "state": state})  # (1, T, O)
        out = out[0]
        if task["kind"] == "classify":
            y = data.labels[i]
            logits = out[-1:] if task["labels"] == "sequence" else out  # (1 or T, C)
            nll += float(_softmax_nll(logits, y).sum())
            correct += int((logits.argmax(axis=1) == y).sum())
            count += len(y)
            continue
        err = out[:-1, :F] - x[1:]
        sq, frames = sq + float((err * err).sum()), frames + err.size
        if horizon and len(x) > horizon:
            o, s = seq.run(None, {"inputs": x[None, :-horizon], "state": state})
            mean, preds = o[:, -1, :F], []
            for _ in range(horizon):
                preds.append(mean[0])
                o, s = step.run(None, {"inputs": mean, "state": s})
                mean = o[:, :F]
            r_sq += float(((np.stack(preds) - x[-horizon:]) ** 2).sum())
            r_n += horizon * F
    if task["kind"] == "classify":
        return {"accuracy": correct / max(count, 1), "loss": nll / max(count, 1), "targets": count}
    out_m = {"rmse": math.sqrt(sq / max(frames, 1))}
    if r_n:
        out_m[f"rollout{horizon}_rmse"] = math.sqrt(r_sq / r_n)
    return out_m


def export_series_model(model: SeriesModel, info: dict[str, Any], repo: str | Path, name: str,
                        version: int | None = None, metrics: dict[str, Any] | None = None,
                        source: dict[str, Any] | None = None, eval_set: SeriesSet | None = None, *,
                        step_tol: float = STEP_TOL, seq_tol: float = SEQ_TOL) -> Path:
    """Check and publish a sequence model as <repo>/<name>/<version>/; returns the folder, writes nothing on failure."""
    check_name(name)
    if version is not None and not (isinstance(version, int) and not isinstance(version, bool) and version > 0):
        raise ExportError(f"version must be a positive integer, got {version!r}")
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).cpu()
    for key, t in model.state_dict().items():
        if t.is_floating_point() and not bool(t.isfinite().all()):
            raise ExportError(f"weight {key} holds NaN or infinite values")
    inp, task = sg.specs(model, info)
    if task["kind"] == "classify" and len(task["classes"]) != model.config.classes:
        raise ExportError(f"{len(task['classes'])} class names for a head of {model.config.classes} classes")
    if inp.get("names") and len(inp["names"]) != model.config.features:
        raise ExportError(f"{len(inp['names'])} feature names for {model.config.features} features")
    t0 = time.perf_counter()
    protos = {STEP_FILE: sg.build_step(model, inp, task), SEQUENCE_FILE: sg.build_sequence(model, inp, task)}
    blobs = og.checked_blobs(name, protos)
    step, seq = open_session(blobs[STEP_FILE]), open_session(blobs[SEQUENCE_FILE])
    checks = sg.parity(model, step, seq)
    scale = checks["output_scale"]
    limits = {"step": step_tol * scale, "sequence_vs_step": seq_tol * scale, "sequence_vs_torch": seq_tol * scale}
    failed = [f"{k} max abs diff {checks[k]:.3g} > {limits[k]:.3g}" for k in limits if not checks[k] <= limits[k]]
    if failed:
        raise ExportError(f"{name}: parity check failed: {'; '.join(failed)}")
    initial = [float(x) for x in model.h0.detach().cpu().float().numpy()]
    out_metrics: dict[str, Any] = {"val_loss": None, "steps": 0, "wall_time_s": 0.0, **(metrics or {})}
    if eval_set is not None:
        if eval_set.features != tuple(inp.get("names") or eval_set.features):
            raise ExportError(f"{eval_set.path}: features {list(eval_set.features)} are not the model's "
                              f"{inp.get('names')}")
        if task["kind"] == "classify" and list(eval_set.classes) != task["classes"]:
            raise ExportError(f"{eval_set.path}: classes {list(eval_set.classes)} are not the model's")
        measured = onnx_metrics(step, seq, eval_set, {"input": inp, "task": task}, np.asarray(initial, np.float32),
                                int(task.get("horizon") or 0))
        for k, v in measured.items():
            if f"test_{k}" in out_metrics:
                out_metrics[f"test_{k}_torch"] = out_metrics[f"test_{k}"]
            out_metrics[f"test_{k}"] = v
        out_metrics["test_sequences"] = len(eval_set)
    c = model.config
    meta = {"name": name, "version": version or 1, "cell": c.cell, "hidden_size": c.hidden_size,
            "state_size": model.state_size, "layers": c.layers, "initial_state": initial,
            "input": inp, "task": task, "metrics": out_metrics,
            "files": {f: sha256_bytes(b) for f, b in blobs.items()}, "opset": OPSET, "ir_version": IR_VERSION,
            "source": {"checkpoint_sha256": None, **(source or {}), "content_sha256": sg.content_hash(model, inp, task),
                       "exporter": FORMAT},
            "checks": {k: float(v) for k, v in checks.items()}}
    final = write_version(Path(repo) / name, blobs, meta, version)
    log.info("exported %s in %.2fs (checks %s)", final, time.perf_counter() - t0, checks)
    return final

"""ONNX graphs of a SeriesModel (vector input), built with `onnx.helper` like the token graphs, and their parity.

The contract (rnnserve.server.contract, VECTOR_IO):
    model.onnx     inputs float32 (B, F),    state (B, S) -> outputs (B, O),    state_out (B, S)
    sequence.onnx  inputs float32 (B, T, F), state (B, S) -> outputs (B, T, O), state_out (B, S)
Both normalise raw inputs themselves ((x - mean) / std), project them with the first layer's W_x, run
the same step body as the token graphs (trainer.onnx_graph), apply the head and, for a forecaster,
undo the normalisation of its outputs (outputs * out_scale + out_shift), as SeriesModel.step/forward do.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from ..server.contract import IR_VERSION, OPSET
from .model import SeriesModel
from .onnx_graph import (
    FLOAT,
    FORMAT,
    _Body,
    _diff,
    _np,
    _one_thread,
    _step_body,
    drop_unused,
    layer_arrays,
    scan_body,
)


def specs(model: SeriesModel, info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """model.json's `input` and `task` objects for this model (info: the checkpoint's `series` record)."""
    c = model.config
    inp: dict[str, Any] = {"kind": "vector", "features": c.features,
                           "mean": [float(v) for v in _np(model.in_mean)],
                           "std": [float(v) for v in _np(model.in_std)]}
    if info.get("features"):
        inp["names"] = [str(n) for n in info["features"]]
    if c.task == "classify":
        classes = [str(n) for n in info.get("classes") or range(c.classes)]
        task: dict[str, Any] = {"kind": "classify", "classes": classes, "labels": info.get("labels") or "sequence"}
    else:
        task = {"kind": "forecast", "outputs": ["mean", "log_var"] if c.loss == "nll" else ["mean"],
                "output_size": c.output_size}
        if info.get("horizon"):
            task["horizon"] = int(info["horizon"])
    return inp, task


def _initializers(model: SeriesModel) -> list[onnx.TensorProto]:
    cell = model.cells[0]
    arrays = {"in.mean": _np(model.in_mean), "in.std": _np(model.in_std), "l0.w_x": _np(cell.w_x),
              "l0.b_x": _np(cell.b_x if cell.kind == "gru" else cell.b), **layer_arrays(model)}
    if model.config.task == "forecast":
        arrays["out.scale"], arrays["out.shift"] = _np(model.out_scale), _np(model.out_shift)
    return [numpy_helper.from_array(a, name) for name, a in arrays.items()]


def _project(b: _Body, inputs: str) -> str:
    """(x - mean) / std, then the first layer's input projection: (..., F) -> (..., G)."""
    xn = b.one("Div", b.one("Sub", inputs, "in.mean"), "in.std")
    return b.one("Add", b.one("MatMul", xn, "l0.w_x"), "l0.b_x")


def _outputs(b: _Body, model: SeriesModel, scores: str) -> None:
    """The head's scores as `outputs`: as they are (class logits) or de-normalised (a forecast)."""
    if model.config.task == "forecast":
        b.nodes.append(helper.make_node("Add", [b.one("Mul", scores, "out.scale"), "out.shift"], ["outputs"],
                                        name="denormalize"))
    else:
        b.nodes.append(helper.make_node("Identity", [scores], ["outputs"], name="outputs_id"))


def _finish(graph: onnx.GraphProto, model: SeriesModel, inp: dict, task: dict, kind: str) -> onnx.ModelProto:
    drop_unused(graph)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnnserve",
                          producer_version=FORMAT)
    m.ir_version = IR_VERSION
    c = model.config
    helper.set_model_props(m, {
        "cell": c.cell, "input": json.dumps(inp), "task": json.dumps(task, ensure_ascii=False),
        "hidden_size": str(c.hidden_size), "state_size": str(model.state_size), "layers": str(c.layers),
        "initial_state": json.dumps([float(x) for x in _np(model.h0)]), "format": FORMAT, "graph": kind})
    return m


def build_step(model: SeriesModel, inp: dict, task: dict) -> onnx.ModelProto:
    """model.onnx: one raw frame (B, F) and state (B, S) -> outputs (B, O), state_out (B, S)."""
    S, F, O = model.state_size, model.config.features, model.config.output_size
    b = _Body("")
    h = _step_body(b, model, _project(b, "inputs"), "state", "state_out")
    _outputs(b, model, b.one("Gemm", h, "head.w", "head.b"))  # (B, O)
    graph = helper.make_graph(
        b.nodes, "rnnserve_vector_step",
        [helper.make_tensor_value_info("inputs", FLOAT, ["batch", F]),
         helper.make_tensor_value_info("state", FLOAT, ["batch", S])],
        [helper.make_tensor_value_info("outputs", FLOAT, ["batch", O]),
         helper.make_tensor_value_info("state_out", FLOAT, ["batch", S])],
        initializer=_initializers(model))
    return _finish(graph, model, inp, task, "step")


def build_sequence(model: SeriesModel, inp: dict, task: dict) -> onnx.ModelProto:
    """sequence.onnx: a Scan of the step body over raw frames (B, T, F) -> outputs (B, T, O), state_out."""
    S, F, O = model.state_size, model.config.features, model.config.output_size
    body_graph = scan_body(model)
    b = _Body("")
    xp = _project(b, "inputs")  # (B, T, G)
    b.nodes.append(helper.make_node("Scan", ["state", xp], ["state_out", "hs"], name="over_time", body=body_graph,
                                    num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1]))  # (B, T, H)
    _outputs(b, model, b.one("Add", b.one("MatMul", "hs", "head.w"), "head.b"))  # (B, T, O)
    graph = helper.make_graph(
        b.nodes, "rnnserve_vector_sequence",
        [helper.make_tensor_value_info("inputs", FLOAT, ["batch", "time", F]),
         helper.make_tensor_value_info("state", FLOAT, ["batch", S])],
        [helper.make_tensor_value_info("outputs", FLOAT, ["batch", "time", O]),
         helper.make_tensor_value_info("state_out", FLOAT, ["batch", S])],
        initializer=_initializers(model))
    return _finish(graph, model, inp, task, "sequence")


def content_hash(model: SeriesModel, inp: dict, task: dict) -> str:
    """sha256 of what an export depends on: exporter format, config, input and task specs, every weight."""
    d = hashlib.sha256()
    d.update(FORMAT.encode())
    d.update(json.dumps([model.config.to_dict(), inp, task], sort_keys=True).encode())
    for key, t in sorted(model.state_dict().items()):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        d.update(f"{key}:{a.dtype}:{a.shape}".encode())
        d.update(a.tobytes())
    return d.hexdigest()


@torch.no_grad()
def parity(model: SeriesModel, step: ort.InferenceSession, seq: ort.InferenceSession, steps: int = 64,
           seed: int = 0) -> dict[str, float]:
    """Max abs differences on raw frames drawn around the training distribution: step vs model.step,
    sequence vs a loop of step, sequence vs model.forward; and `output_scale` = max(1, max |outputs|)."""
    was = model.training
    model.eval()
    g = np.random.default_rng(seed)
    F, S = model.config.features, model.state_size
    mean, std = _np(model.in_mean), _np(model.in_std)

    def frames(*shape: int) -> np.ndarray:
        return (mean + std * g.standard_normal((*shape, F))).astype(np.float32)

    out = {"step": 0.0, "sequence_vs_step": 0.0, "sequence_vs_torch": 0.0, "output_scale": 1.0}
    with _one_thread():
        try:
            for batch in (1, 3, 8):
                x, state = frames(batch), g.uniform(-1.0, 1.0, (batch, S)).astype(np.float32)
                o, s = step.run(None, {"inputs": x, "state": state})
                t_o, t_s = model.step(torch.from_numpy(x), torch.from_numpy(state))
                out["step"] = max(out["step"], _diff(o, t_o.numpy()), _diff(s, t_s.numpy()))
                out["output_scale"] = max(out["output_scale"], float(np.abs(t_o.numpy()).max()))
            x, state0 = frames(2, steps), g.uniform(-1.0, 1.0, (2, S)).astype(np.float32)
            s_o, s_s = seq.run(None, {"inputs": x, "state": state0})  # (B, T, O), (B, S)
            state, loop = state0, []
            for t in range(steps):
                o, state = step.run(None, {"inputs": x[:, t], "state": state})
                loop.append(o)
            out["sequence_vs_step"] = max(_diff(s_o, np.stack(loop, axis=1)), _diff(s_s, state))
            t_o, t_s = model(torch.from_numpy(x), torch.from_numpy(state0))
            out["sequence_vs_torch"] = max(_diff(s_o, t_o.numpy()), _diff(s_s, t_s.numpy()))
            out["output_scale"] = max(out["output_scale"], float(np.abs(t_o.numpy()).max()))
        finally:
            model.train(was)
    return out

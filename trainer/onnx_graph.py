"""ONNX graphs built directly from an RNNModel's weights, and the parity checks that guard them.

Building with `onnx.helper` instead of tracing is deterministic, takes milliseconds and names the
inputs and dynamic axes exactly as the ONNX contract (README.md, "The ONNX contract") says:
    model.onnx     tokens int64 (B,),   state float32 (B, S) -> logits (B, V),    state_out (B, S)
    sequence.onnx  tokens int64 (B, T), state float32 (B, S) -> logits (B, T, V), state_out (B, S)
sequence.onnx is a Scan over time around the same step body model.onnx holds. The embedding and
the first layer's input projection are folded into one (V, G) table gathered by token id.
"""
from __future__ import annotations

import contextlib
import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from ..server.contract import IR_VERSION, OPSET
from .model import RNNModel, SeriesModel
from .publish import ExportError

FORMAT = "rnnserve-onnx/1"
FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _np(t: torch.Tensor) -> np.ndarray:
    """A parameter as a contiguous float32 numpy array."""
    return np.ascontiguousarray(t.detach().cpu().to(torch.float32).numpy())


def fold_table(model: RNNModel) -> np.ndarray:
    """embed(token) W_x + b for every token: (V, G) float32.

    Computed with the same float32 torch ops as Cell.project, so each row equals what model.step
    computes for that token (bitwise on the CPU here), and no rounding difference enters the recurrence.
    """
    cell = model.cells[0]
    with torch.no_grad():
        table = cell.project(model.embed.weight.detach().cpu().float())  # (V, G)
    return _np(table)


def initializers(model: RNNModel) -> list[TensorProto]:
    """Every weight and constant the step body reads, as named initializers."""
    arrays: dict[str, np.ndarray] = {"emb_proj": fold_table(model), **layer_arrays(model)}
    return [numpy_helper.from_array(a, name) for name, a in arrays.items()]


def layer_arrays(model: RNNModel | SeriesModel) -> dict[str, np.ndarray]:
    """The cells' weights (all but the first layer's input projection), the head and the body's constants."""
    H = model.config.hidden_size
    arrays: dict[str, np.ndarray] = {}
    for i, cell in enumerate(model.cells):
        arrays[f"l{i}.w_h"] = _np(cell.w_h)
        if cell.kind == "gru":
            arrays[f"l{i}.b_h"] = _np(cell.b_h)
        if i > 0:
            arrays[f"l{i}.w_x"] = _np(cell.w_x)
            arrays[f"l{i}.b_x"] = _np(cell.b_x if cell.kind == "gru" else cell.b)
    arrays["head.w"] = _np(model.head.weight.t())  # (H, V)
    arrays["head.b"] = _np(model.head.bias)
    arrays["one"] = np.array(1.0, dtype=np.float32)
    arrays["layer_split"] = np.array(model.state_sizes, dtype=np.int64)
    arrays["split2"] = np.array([H] * 2, dtype=np.int64)
    arrays["split3"] = np.array([H] * 3, dtype=np.int64)
    arrays["split4"] = np.array([H] * 4, dtype=np.int64)
    return arrays


class _Body:
    """Emits the nodes of one step with unique names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.n = prefix, [], 0

    def op(self, op: str, inputs: list[str], outputs: int = 1, **attrs) -> list[str]:
        names = [f"{self.prefix}{op.lower()}{self.n}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"{self.prefix}{op}{self.n}", **attrs))
        self.n += 1
        return names

    def one(self, op: str, *inputs: str, **attrs) -> str:
        return self.op(op, list(inputs), 1, **attrs)[0]


def _cell_step(b: _Body, kind: str, i: int, xp: str, s: str) -> tuple[str, str]:
    """One layer's recurrence, as in trainer/cells.py: projected input (B, G), state -> h, state."""
    if kind == "elman":
        h = b.one("Tanh", b.one("Add", xp, b.one("MatMul", s, f"l{i}.w_h")))  # (B, H)
        return h, h
    if kind == "gru":
        hp = b.one("Add", b.one("MatMul", s, f"l{i}.w_h"), f"l{i}.b_h")  # (B, 3H)
        xr, xz, xn = b.op("Split", [xp, "split3"], 3, axis=1)
        hr, hz, hn = b.op("Split", [hp, "split3"], 3, axis=1)
        r = b.one("Sigmoid", b.one("Add", xr, hr))
        z = b.one("Sigmoid", b.one("Add", xz, hz))
        n = b.one("Tanh", b.one("Add", xn, b.one("Mul", r, hn)))
        h = b.one("Add", b.one("Mul", b.one("Sub", "one", z), n), b.one("Mul", z, s))  # (B, H)
        return h, h
    h0, c0 = b.op("Split", [s, "split2"], 2, axis=1)
    gates = b.one("Add", xp, b.one("MatMul", h0, f"l{i}.w_h"))  # (B, 4H)
    gi, gf, gg, go = b.op("Split", [gates, "split4"], 4, axis=1)
    c = b.one("Add", b.one("Mul", b.one("Sigmoid", gf), c0),
              b.one("Mul", b.one("Sigmoid", gi), b.one("Tanh", gg)))  # (B, H)
    h = b.one("Mul", b.one("Sigmoid", go), b.one("Tanh", c))  # (B, H)
    return h, b.one("Concat", h, c, axis=1)


def _step_body(b: _Body, model: RNNModel | SeriesModel, xp: str, state: str, state_out: str) -> str:
    """All layers of one step from the first layer's projected input; returns the top h (B, H)."""
    layers = len(model.cells)
    states = b.op("Split", [state, "layer_split"], layers, axis=1) if layers > 1 else [state]
    outs, h = [], ""
    for i, s in enumerate(states):
        if i > 0:
            xp = b.one("Add", b.one("MatMul", h, f"l{i}.w_x"), f"l{i}.b_x")  # (B, G)
        h, s_new = _cell_step(b, model.config.cell, i, xp, s)
        outs.append(s_new)
    if layers > 1:
        b.nodes.append(helper.make_node("Concat", outs, [state_out], name=f"{b.prefix}state_concat", axis=1))
    else:
        b.nodes.append(helper.make_node("Identity", outs, [state_out], name=f"{b.prefix}state_id"))
    return h


def metadata(model: RNNModel, vocab: list[str], graph: str) -> dict[str, str]:
    """metadata_props: a file alone says what it is."""
    c = model.config
    return {"vocab": json.dumps(vocab, ensure_ascii=False), "cell": c.cell, "hidden_size": str(c.hidden_size),
            "state_size": str(model.state_size), "layers": str(c.layers), "embed_size": str(c.embed_size),
            "initial_state": json.dumps([float(x) for x in _np(model.h0)]), "format": FORMAT, "graph": graph}


def _names_read(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node of the graph, or of a subgraph inside it (a Scan or Loop body), reads."""
    names: set[str] = set()
    for n in graph.node:
        names.update(n.input)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                names |= _names_read(g)
    return names


def drop_unused(graph: onnx.GraphProto) -> onnx.GraphProto:
    """The graph without initializers no node reads (the shared constants of other cell kinds): onnxruntime
    would warn about each one at every load, then drop it."""
    used = _names_read(graph)
    keep = [t for t in graph.initializer if t.name in used]
    if len(keep) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return graph


def _finish(graph: onnx.GraphProto, model: RNNModel, vocab: list[str], kind: str) -> onnx.ModelProto:
    drop_unused(graph)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnnserve",
                          producer_version=FORMAT)
    m.ir_version = IR_VERSION
    helper.set_model_props(m, metadata(model, vocab, kind))
    return m


def build_step(model: RNNModel, vocab: list[str]) -> onnx.ModelProto:
    """model.onnx: one step, tokens (B,) and state (B, S) -> logits (B, V), state_out (B, S)."""
    S, V = model.state_size, model.config.vocab_size
    b = _Body("")
    xp = b.one("Gather", "emb_proj", "tokens", axis=0)  # (B, G)
    h = _step_body(b, model, xp, "state", "state_out")
    b.nodes.append(helper.make_node("Gemm", [h, "head.w", "head.b"], ["logits"], name="head"))  # (B, V)
    graph = helper.make_graph(
        b.nodes, "rnnserve_step",
        [helper.make_tensor_value_info("tokens", INT64, ["batch"]),
         helper.make_tensor_value_info("state", FLOAT, ["batch", S])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", V]),
         helper.make_tensor_value_info("state_out", FLOAT, ["batch", S])],
        initializer=initializers(model))
    return _finish(graph, model, vocab, "step")


def checked_blobs(name: str, protos: dict[str, onnx.ModelProto]) -> dict[str, bytes]:
    """Each graph through onnx.checker (full check), then serialised; ExportError naming the file it rejects."""
    for fname, proto in protos.items():
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{name}: onnx.checker rejects {fname}: {e}") from None
    return {f: p.SerializeToString() for f, p in protos.items()}


def scan_body(model: RNNModel | SeriesModel) -> onnx.GraphProto:
    """The Scan body of sequence.onnx, for both model kinds: one step of the cells from the projected input
    s_xp (B, G) and s_state (B, S) to s_state_next and the top layer's s_h (B, H)."""
    S, H = model.state_size, model.config.hidden_size
    G = model.cells[0].gates * H
    body = _Body("s_")
    h = _step_body(body, model, "s_xp", "s_state", "s_state_next")
    body.nodes.append(helper.make_node("Identity", [h], ["s_h"], name="s_h_out"))
    body_graph = helper.make_graph(
        body.nodes, "step_body",
        [helper.make_tensor_value_info("s_state", FLOAT, ["batch", S]),
         helper.make_tensor_value_info("s_xp", FLOAT, ["batch", G])],
        [helper.make_tensor_value_info("s_state_next", FLOAT, ["batch", S]),
         helper.make_tensor_value_info("s_h", FLOAT, ["batch", H])])
    return body_graph


def build_sequence(model: RNNModel, vocab: list[str]) -> onnx.ModelProto:
    """sequence.onnx: a Scan over time of the step body, tokens (B, T) -> logits (B, T, V), state_out."""
    S, V = model.state_size, model.config.vocab_size
    body_graph = scan_body(model)
    nodes = [
        helper.make_node("Gather", ["emb_proj", "tokens"], ["xp_all"], name="project", axis=0),  # (B, T, G)
        helper.make_node("Scan", ["state", "xp_all"], ["state_out", "hs"], name="over_time", body=body_graph,
                         num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1]),  # (B, T, H)
        helper.make_node("MatMul", ["hs", "head.w"], ["hs_w"], name="head_mm"),  # (B, T, V)
        helper.make_node("Add", ["hs_w", "head.b"], ["logits"], name="head_add"),
    ]
    graph = helper.make_graph(
        nodes, "rnnserve_sequence",
        [helper.make_tensor_value_info("tokens", INT64, ["batch", "time"]),
         helper.make_tensor_value_info("state", FLOAT, ["batch", S])],
        [helper.make_tensor_value_info("logits", FLOAT, ["batch", "time", V]),
         helper.make_tensor_value_info("state_out", FLOAT, ["batch", S])],
        initializer=initializers(model))
    return _finish(graph, model, vocab, "sequence")


def content_hash(model: RNNModel, vocab: list[str]) -> str:
    """sha256 of what an export depends on: exporter format, config, vocab and every weight."""
    d = hashlib.sha256()
    d.update(FORMAT.encode())
    d.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    d.update(json.dumps(list(vocab), ensure_ascii=False).encode())
    for key, t in sorted(model.state_dict().items()):
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        d.update(f"{key}:{a.dtype}:{a.shape}".encode())
        d.update(a.tobytes())
    return d.hexdigest()


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|, infinite when either side is not finite, so NaN never passes a check."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


@contextlib.contextmanager
def _one_thread():
    """torch on one thread: these ops are tiny, and a second thread on a busy machine costs ms per op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def parity(model: RNNModel, step: ort.InferenceSession, seq: ort.InferenceSession, steps: int = 256,
           seed: int = 0) -> dict[str, float]:
    """Max abs differences: step vs model.step, sequence vs a loop of step, sequence vs model.forward.

    Also `logit_scale` = max(1, max |logits|): float32 rounding in two implementations (onnxruntime's
    MLAS tanh and matmuls vs torch's) grows with it, which bounds what sequence_vs_torch can promise.
    """
    was_training = model.training
    model.eval()
    g = np.random.default_rng(seed)
    V, S = model.config.vocab_size, model.state_size
    out = {"step": 0.0, "sequence_vs_step": 0.0, "sequence_vs_torch": 0.0}
    with _one_thread():
        try:
            for batch in (1, 3, 8):
                tokens = g.integers(0, V, size=batch, dtype=np.int64)  # (B,)
                state = g.uniform(-1.0, 1.0, (batch, S)).astype(np.float32)  # (B, S): where h lives
                logits, state_out = step.run(None, {"tokens": tokens, "state": state})
                t_logits, t_state = model.step(torch.from_numpy(tokens), torch.from_numpy(state))
                out["step"] = max(out["step"], _diff(logits, t_logits.numpy()), _diff(state_out, t_state.numpy()))
            tokens = g.integers(0, V, size=(2, steps), dtype=np.int64)  # (B, T)
            state0 = g.uniform(-1.0, 1.0, (2, S)).astype(np.float32)  # (B, S)
            s_logits, s_state = seq.run(None, {"tokens": tokens, "state": state0})  # (B, T, V), (B, S)
            state, loop = state0, []
            for t in range(steps):
                lg, state = step.run(None, {"tokens": tokens[:, t], "state": state})  # (B, V), (B, S)
                loop.append(lg)
            out["sequence_vs_step"] = max(_diff(s_logits, np.stack(loop, axis=1)), _diff(s_state, state))
            t_logits, t_state = model(torch.from_numpy(tokens), torch.from_numpy(state0))  # (B, T, V)
            out["sequence_vs_torch"] = max(_diff(s_logits, t_logits.numpy()), _diff(s_state, t_state.numpy()))
            out["logit_scale"] = max(1.0, float(t_logits.abs().max()))
        finally:
            model.train(was_training)
    return out


def onnx_val_loss(seq: ort.InferenceSession, text: str, vocab: list[str], initial_state: np.ndarray,
                  chunk: int = 2048) -> float:
    """Mean nats/char on the last 10% of text: one stream from the initial state, chunks carrying state."""
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted(set(text) - index.keys())
    if unknown:
        raise ExportError(f"eval corpus has characters outside the vocabulary: {''.join(unknown[:20])!r}")
    ids = np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))
    n_val = max(2, int(len(ids) * 0.1))  # as trainer.data.split
    if len(ids) - n_val < 2:
        raise ExportError(f"eval corpus of {len(ids)} characters is too short to split 10% off")
    val = ids[-n_val:]
    length, total = len(val) - 1, 0.0
    state = np.asarray(initial_state, dtype=np.float32)[None]  # (1, S)
    for s in range(0, length, chunk):
        e = min(s + chunk, length)
        logits, state = seq.run(None, {"tokens": val[None, s:e], "state": state})  # (1, t, V), (1, S)
        lg = logits[0].astype(np.float64)  # (t, V)
        top = lg.max(axis=1)
        lse = top + np.log(np.exp(lg - top[:, None]).sum(axis=1))  # (t,)
        total += float((lse - lg[np.arange(e - s), val[s + 1 : e + 1]]).sum())
    return total / length

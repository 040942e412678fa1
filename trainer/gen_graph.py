"""generate.onnx: K steps of the cell with sampling inside the graph (an ONNX Loop), K tokens per call.

    generate.onnx  state (B, S), logits (B, V), uniforms (B, K), temperature (B,), top_k (B,), top_p (B,)
                   -> tokens int64 (B, K), state_out (B, S), logits_out (B, V)
Step i samples t_i from logits_i with uniforms[:, i] exactly as server/sampling.py's `sample` (in float32),
then (logits_{i+1}, state_{i+1}) = step(t_i, state_i). The Loop body is the step graph of model.onnx
itself, its values renamed, so a version built from weights (`build_generate`) and one built from a
published model.onnx (`generate_from_step`) are the same graph. Filtered rows sort with TopK, which puts
equal values in ascending token id (a stable sort); numpy's argsort leaves their order unspecified. Inside
the kept set the order of ties does not change the distribution (each kept token keeps its own mass);
only where the top-k or top-p cut falls between exactly equal probabilities may the two keep different
(equally likely) tokens. This module is torch-free, except for `build_generate`.
"""
from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ..server.contract import (
    GENERATE_FILE,
    IO,
    IR_VERSION,
    OPSET,
    SEQUENCE_FILE,
    STEP_FILE,
    ModelFormatError,
    open_session,
    sha256_bytes,
    verify_version_dir,
)
from ..server.sampling import GREEDY_BELOW, sample
from .publish import ExportError, check_name, write_version

if TYPE_CHECKING:
    from .model import RNNModel

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
PREFIX = "g_"  # the step graph's values inside the Loop body (and its weights outside it)
BOUNDARY = 1e-5  # a uniform this close to a CDF boundary (relative to the total mass) may pick either side


class _Emit:
    """Appends nodes with unique output names under a prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.n = prefix, [], 0

    def op(self, op: str, inputs: list[str], outputs: int = 1, out: str | None = None, **attrs) -> list[str]:
        names = [out] if out else [f"{self.prefix}{op.lower()}{self.n}_{k}" for k in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=f"{self.prefix}{op}{self.n}", **attrs))
        self.n += 1
        return names

    def one(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        return self.op(op, list(inputs), 1, out, **attrs)[0]


def _count(e: _Emit, mask: str) -> str:
    """Number of true entries per row: bool (B, V) -> int64 (B,)."""
    return e.one("ReduceSum", e.one("Cast", mask, to=INT64), "gen.axes1", keepdims=0)


def _inverse_cdf(e: _Emit, weights: str, u_col: str) -> tuple[str, str, str]:
    """weights (B, V) >= 0, u (B, 1) -> (count(cdf <= u * total) (B,), cdf (B, V), total (B, 1))."""
    cdf = e.one("CumSum", weights, "gen.axis1")  # (B, V) float32, in order
    total = e.one("Gather", cdf, "gen.last", axis=1)  # (B, 1)
    target = e.one("Mul", u_col, total)  # (B, 1)
    return _count(e, e.one("LessOrEqual", cdf, target)), cdf, total


def _top_k_keeps(e: _Emit, k: str) -> str:
    """How many sorted positions top-k keeps: k (B,) (V in a row without top-k) -> (B,) int64, k itself."""
    return k


def _keep_first_k(e: _Emit, p: str, k_col: str) -> str:
    """Zero every sorted position >= k: p (B, n), k (B, 1) -> (B, n)."""
    return e.one("Where", e.one("Less", "gen.positions_n", k_col), p, "gen.zero_f")


def _nucleus(e: _Emit, p: str, p_col: str, nucleus_col: str) -> str:
    """Zero a sorted token when the normalised mass before it is >= top_p (only in rows with a nucleus).

    Sequential sums only (the exclusive cumsum, and its last plus the last p as the total), so `before`
    never decreases along a row and trailing zeros (a wider sort for another row) change no bit."""
    excl = e.one("CumSum", p, "gen.axis1", exclusive=1)  # (B, n) the first is 0
    total = e.one("Add", e.one("Gather", excl, "gen.last", axis=1), e.one("Gather", p, "gen.last", axis=1))
    before = e.one("Div", excl, total)  # (B, n)
    drop = e.one("And", e.one("GreaterOrEqual", before, p_col), nucleus_col)  # (B, n)
    return e.one("Where", drop, "gen.zero_f", p)


def _branch(e: _Emit, cond: str, then: _Emit, result: str, fallback: str, out: str) -> None:
    """If(cond): `then`'s nodes giving `result` (B,) int64, else `fallback` (run when a row needs it)."""
    other = _Emit(then.prefix + "else_")
    other.one("Identity", fallback, out=f"{other.prefix}out")
    graphs = [helper.make_graph(g.nodes, f"{g.prefix}branch", [],
                                [helper.make_tensor_value_info(r, INT64, ["batch"])])
              for g, r in ((then, result), (other, f"{other.prefix}out"))]
    e.one("If", cond, out=out, then_branch=graphs[0], else_branch=graphs[1])


def _sampler(e: _Emit, logits: str, u: str, token: str) -> None:
    """The body's sampling, as sampling.sample: logits (B, V), this step's uniforms (B,) -> `token` (B,)."""
    greedy = e.one("ArgMax", logits, axis=1, keepdims=0, select_last_index=0)  # (B,) the first maximum
    u_col = e.one("Unsqueeze", u, "gen.axes1")  # (B, 1)
    z = e.one("Div", e.one("Sub", logits, e.one("ReduceMax", logits, axes=[1], keepdims=1)),
              "gen.t_col")  # (B, V) <= 0 (greedy rows divide by 1)
    # no filter: inverse CDF in vocabulary order, clamped to the last index whose cdf is below the total
    pl = _Emit(f"{e.prefix}plain_")
    idx, cdf, total = _inverse_cdf(pl, pl.one("Exp", z), u_col)
    plain_tok = pl.one("Min", idx, _count(pl, pl.one("Less", cdf, total)))  # (B,)
    _branch(e, "gen.any_plain", pl, plain_tok, greedy, f"{e.prefix}plain_tok")
    # top-k / top-p: most probable first, cut, inverse CDF over what is kept, clamped to the last kept
    fl = _Emit(f"{e.prefix}filtered_")
    # (B, n) each, n = the largest k of a filtered row (V with a top-p row); ties: lower id first
    srt, order = fl.op("TopK", [z, "gen.n"], 2, axis=1, largest=1, sorted=1)
    # exp(srt): srt[:, 0] = (max - max) / T = 0 exactly, so this is sampling.py's exp(srt - srt[:, :1])
    p = _nucleus(fl, _keep_first_k(fl, fl.one("Exp", srt), "gen.k_col"), "gen.p_col", "gen.nucleus_col")
    idx, _, _ = _inverse_cdf(fl, p, u_col)
    last_kept = fl.one("Sub", _count(fl, fl.one("Greater", p, "gen.zero_f")), "gen.one_i")  # (B,)
    pos = fl.one("Min", idx, last_kept)  # (B,)
    pos_col = fl.one("Unsqueeze", pos, "gen.axes1")  # (B, 1)
    filt_tok = fl.one("Squeeze", fl.one("GatherElements", order, pos_col, axis=1), "gen.axes1")  # (B,)
    _branch(e, "gen.any_filtered", fl, filt_tok, greedy, f"{e.prefix}filtered_tok")
    e.one("Where", "gen.plain", f"{e.prefix}plain_tok",
          e.one("Where", "gen.filtered", f"{e.prefix}filtered_tok", greedy), out=token)


def _prepare(e: _Emit) -> None:
    """Per-row settings, once per call outside the Loop: which path each row takes (as sampling.sample)."""
    hot = e.one("Greater", "temperature", "gen.greedy_below")  # (B,)
    t_safe = e.one("Where", hot, "temperature", "gen.one_f")  # greedy rows divide by 1, never by 0
    e.one("Unsqueeze", t_safe, "gen.axes1", out="gen.t_col")  # (B, 1)
    no_k = e.one("Or", e.one("LessOrEqual", "top_k", "gen.zero_i"), e.one("GreaterOrEqual", "top_k", "gen.v"))
    k = e.one("Where", no_k, "gen.v", "top_k")  # (B,) V = no top-k filter
    keep = _top_k_keeps(e, k)  # (B,)
    e.one("Unsqueeze", keep, "gen.axes1", out="gen.k_col")
    no_p = e.one("Or", e.one("LessOrEqual", "top_p", "gen.zero_f"),
                 e.one("GreaterOrEqual", "top_p", "gen.one_f"))
    plain = e.one("And", hot, e.one("And", e.one("Equal", k, "gen.v"), no_p), out="gen.plain")
    filtered = e.one("And", hot, e.one("Not", plain), out="gen.filtered")
    for mask, out in ((plain, "gen.any_plain"), (filtered, "gen.any_filtered")):  # () bool: a row takes it
        e.one("Greater", e.one("ReduceSum", e.one("Cast", mask, to=INT64), keepdims=0), "gen.zero_i", out=out)
    # sort only as far as a filtered row keeps: n = max k (V for a row without top-k), (1,)
    ks = e.one("Concat", e.one("Where", filtered, keep, "gen.one_i"), "gen.one_1", axis=0)  # (B + 1,)
    n = e.one("ReduceMax", ks, keepdims=1, out="gen.n")
    e.one("Slice", "gen.positions", "gen.zero_1", n, "gen.axes1", out="gen.positions_n")  # (1, n)
    nucleus = e.one("And", e.one("Greater", "top_p", "gen.zero_f"), e.one("Less", "top_p", "gen.one_f"))
    e.one("Unsqueeze", nucleus, "gen.axes1", out="gen.nucleus_col")
    e.one("Unsqueeze", "top_p", "gen.axes1", out="gen.p_col")


def _constants(V: int) -> list[TensorProto]:
    """The sampler's constants (outer-graph initializers, prefixed gen.)."""
    arrays = {"gen.axis1": np.array(1, np.int64), "gen.axes1": np.array([1], np.int64),
              "gen.zero_1": np.array([0], np.int64), "gen.one_1": np.array([1], np.int64),
              "gen.last": np.array([-1], np.int64), "gen.one_i": np.array(1, np.int64),
              "gen.zero_i": np.array(0, np.int64), "gen.v": np.array(V, np.int64),
              "gen.positions": np.arange(V, dtype=np.int64)[None], "gen.zero_f": np.array(0.0, np.float32),
              "gen.one_f": np.array(1.0, np.float32), "gen.greedy_below": np.array(GREEDY_BELOW, np.float32)}
    return [numpy_helper.from_array(a, name) for name, a in arrays.items()]


def _renamed_step(graph: onnx.GraphProto) -> tuple[list[onnx.NodeProto], list[TensorProto], int, int]:
    """The step graph's nodes and used weights, every value prefixed; also (S, V) read from its outputs."""
    (want_in, want_out), weights = IO[STEP_FILE], {t.name for t in graph.initializer}
    got_in = [i.name for i in graph.input if i.name not in weights]
    if got_in != [n for n, _, _ in want_in] or [o.name for o in graph.output] != [n for n, _, _ in want_out]:
        raise ExportError(f"the step graph's inputs {got_in} and outputs {[o.name for o in graph.output]} "
                          "break the contract")
    dims = {o.name: [d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    V, S = dims["logits"][-1], dims["state_out"][-1]
    if V <= 0 or S <= 0:
        raise ExportError("the step graph's logits and state_out need a fixed last axis")
    produced = {o for n in graph.node for o in n.output}
    used = {i for n in graph.node for i in n.input}
    clash = used & {"iter", "cond", "cond_out", "logits_in"}  # names the body gives its own values
    if clash:
        raise ExportError(f"the step graph uses names the Loop body needs: {sorted(clash)}")
    nodes = []
    for n in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            raise ExportError(f"the step graph's node {n.name!r} holds a subgraph; not supported")
        m = copy.deepcopy(n)
        m.input[:] = [PREFIX + x if x else x for x in n.input]
        m.output[:] = [PREFIX + x if x else x for x in n.output]
        m.name = PREFIX + n.name
        nodes.append(m)
    for o in graph.output:  # an input or a weight as an output would need a node to leave the body
        if o.name not in produced:
            raise ExportError(f"the step graph's output {o.name!r} is not computed by a node")
    inits = []
    for t in graph.initializer:
        if t.name not in used:  # a weight this cell does not read (onnxruntime would warn, then drop it)
            continue
        w = copy.deepcopy(t)
        w.name = PREFIX + t.name
        inits.append(w)
    return nodes, inits, S, V


def generate_from_step(step_model: onnx.ModelProto | bytes) -> onnx.ModelProto:
    """generate.onnx from a step graph (model.onnx's proto or bytes): the step becomes the Loop body."""
    step = onnx.load_from_string(step_model) if isinstance(step_model, bytes) else step_model
    nodes, weights, S, V = _renamed_step(step.graph)
    body = _Emit("gs_")
    u = body.one("Gather", "uniforms", f"{PREFIX}iter", axis=1)  # (B,) this step's uniforms
    _sampler(body, f"{PREFIX}logits_in", u, f"{PREFIX}tokens")  # feeds the step's renamed `tokens`
    body.one("Identity", f"{PREFIX}cond", out=f"{PREFIX}cond_out")
    body_graph = helper.make_graph(
        body.nodes + nodes, "generate_body",
        [helper.make_tensor_value_info(f"{PREFIX}iter", INT64, []),
         helper.make_tensor_value_info(f"{PREFIX}cond", BOOL, []),
         helper.make_tensor_value_info(f"{PREFIX}state", FLOAT, ["batch", S]),
         helper.make_tensor_value_info(f"{PREFIX}logits_in", FLOAT, ["batch", V])],
        [helper.make_tensor_value_info(f"{PREFIX}cond_out", BOOL, []),
         helper.make_tensor_value_info(f"{PREFIX}state_out", FLOAT, ["batch", S]),
         helper.make_tensor_value_info(f"{PREFIX}logits", FLOAT, ["batch", V]),
         helper.make_tensor_value_info(f"{PREFIX}tokens", INT64, ["batch"])])
    outer = _Emit("go_")
    _prepare(outer)
    k = outer.one("Gather", outer.one("Shape", "uniforms"), "gen.one_i", axis=0)  # () K, from uniforms (B, K)
    outer.op("Loop", [k, "", "state", "logits"], 3, body=body_graph)
    outer.nodes[-1].output[:] = ["state_out", "logits_out", "go_tokens_kb"]  # tokens (K, B)
    batch = outer.one("Slice", outer.one("Shape", "state"), "gen.zero_1", "gen.axes1")  # (1,) B
    kb = outer.one("Concat", outer.one("Unsqueeze", k, "gen.zero_1"), batch, axis=0)  # (2,) [K, B]
    kb_tokens = outer.one("Reshape", "go_tokens_kb", kb, allowzero=1)  # (K, B), also when K = 0
    outer.one("Transpose", kb_tokens, perm=[1, 0], out="tokens")  # (B, K)
    graph = helper.make_graph(
        outer.nodes, "rnnserve_generate",
        [helper.make_tensor_value_info("state", FLOAT, ["batch", S]),
         helper.make_tensor_value_info("logits", FLOAT, ["batch", V]),
         helper.make_tensor_value_info("uniforms", FLOAT, ["batch", "steps"]),
         helper.make_tensor_value_info("temperature", FLOAT, ["batch"]),
         helper.make_tensor_value_info("top_k", INT64, ["batch"]),
         helper.make_tensor_value_info("top_p", FLOAT, ["batch"])],
        [helper.make_tensor_value_info("tokens", INT64, ["batch", "steps"]),
         helper.make_tensor_value_info("state_out", FLOAT, ["batch", S]),
         helper.make_tensor_value_info("logits_out", FLOAT, ["batch", V])],
        initializer=weights + _constants(V))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                          producer_name=step.producer_name, producer_version=step.producer_version)
    m.ir_version = IR_VERSION
    props = {p.key: p.value for p in step.metadata_props}
    helper.set_model_props(m, {**props, "graph": "generate"})
    return m


def build_generate(model: RNNModel, vocab: list[str]) -> onnx.ModelProto:
    """generate.onnx from a trained model: its step graph (onnx_graph.build_step) as the Loop body."""
    from . import onnx_graph as og  # torch: only this entry needs it

    return generate_from_step(og.build_step(model, vocab))


# settings of the sampled check's rows: (temperature, top_k, top_p); a greedy row rides along
CHECK_ROWS = ((1.0, 0, 0.0), (0.6, 0, 1.0), (1.0, 5, 0.0), (0.8, 0, 0.9), (1.3, 10, 0.7), (0.0, 3, 0.5))


def replay(step: ort.InferenceSession, gen: ort.InferenceSession, state: np.ndarray, logits: np.ndarray,
           uniforms: np.ndarray, temperature: np.ndarray, top_k: np.ndarray,
           top_p: np.ndarray) -> dict[str, float]:
    """Run generate.onnx once, then replay it with model.onnx and server.sampling's `sample`, step by step.

    The replay steps model.onnx with the graph's own tokens (one disagreement does not derail the rest).
    mismatches: tokens that differ from `sample` on the same logits and still differ with the uniform moved
    by BOUNDARY either way (a greedy row has no such excuse); boundary_cases: those that differ only within
    BOUNDARY; tie_cases: those whose logit equals sample's token's (a sort may order equal values either
    way); state_diff: max |difference| of state_out and logits_out (inf when not finite)."""
    feeds = {"state": state, "logits": logits, "uniforms": uniforms, "temperature": temperature,
             "top_k": top_k, "top_p": top_p}
    tokens, g_state, g_logits = gen.run(["tokens", "state_out", "logits_out"], feeds)  # (B, K) (B, S) (B, V)
    t, p = temperature.astype(np.float64), top_p.astype(np.float64)  # as the server passes them
    out = {"mismatches": 0.0, "boundary_cases": 0.0, "tie_cases": 0.0, "state_diff": 0.0}
    for i in range(uniforms.shape[1]):
        u = uniforms[:, i].astype(np.float64)  # (B,)
        ref = sample(logits, t, top_k, p, u)  # (B,)
        for r in np.nonzero(ref != tokens[:, i])[0]:
            if t[r] > GREEDY_BELOW and logits[r, tokens[r, i]] == logits[r, ref[r]]:
                out["tie_cases"] += 1
                continue
            one = (logits[r:r + 1], t[r:r + 1], top_k[r:r + 1], p[r:r + 1])
            moved = np.clip(u[r] + np.array([-BOUNDARY, BOUNDARY]), 0.0, np.nextafter(1.0, 0.0))  # (2,)
            near = [sample(*one, moved[j:j + 1])[0] for j in range(2)]
            out["boundary_cases" if tokens[r, i] in near else "mismatches"] += 1
        logits, state = step.run(["logits", "state_out"], {"tokens": tokens[:, i], "state": state})
    if g_state.size:
        diff = max(float(np.abs(g_state - state).max()), float(np.abs(g_logits - logits).max()))
        out["state_diff"] = diff if np.isfinite(diff) else float("inf")
    return out


def generate_parity(step: ort.InferenceSession, gen: ort.InferenceSession, initial_state: np.ndarray,
                    steps: int = 64, seed: int = 0) -> dict[str, float]:
    """generate.onnx vs a loop of model.onnx (`replay`) from the initial state after one prompt token per row.

    greedy_mismatches: tokens of 3 greedy rows that differ from a loop of model.onnx with argmax (the replay
    is that loop when there are none); sampled_mismatches, boundary_cases and tie_cases: of one row per
    CHECK_ROWS setting with fixed uniforms; state_diff: the larger of the two replays' (0 = bitwise equal)."""
    g = np.random.default_rng(seed)
    V = gen.get_outputs()[2].shape[-1]
    out = {"greedy_mismatches": 0.0, "sampled_mismatches": 0.0, "boundary_cases": 0.0, "tie_cases": 0.0,
           "state_diff": 0.0}
    for kind, settings in (("greedy", ((0.0, 0, 0.0),) * 3), ("sampled", CHECK_ROWS)):
        B = len(settings)
        t, k, p = (np.array(c, dt) for c, dt in zip(zip(*settings), (np.float32, np.int64, np.float32)))
        tokens0 = (np.arange(B, dtype=np.int64) * 7) % V  # (B,) one prompt token per row
        feeds = {"tokens": tokens0, "state": np.tile(initial_state, (B, 1))}
        logits, state = step.run(["logits", "state_out"], feeds)  # (B, V), (B, S)
        r = replay(step, gen, state, logits, g.random((B, steps), dtype=np.float32), t, k, p)
        out[f"{kind}_mismatches"] = r["mismatches"]
        out["boundary_cases"] += r["boundary_cases"]
        out["tie_cases"] += r["tie_cases"]
        out["state_diff"] = max(out["state_diff"], r["state_diff"])
    return out


def parity_failures(checks: dict[str, float]) -> list[str]:
    """What generate_parity found wrong (greedy tokens and states bitwise; sampled tokens but at edges)."""
    return [f"generate {k} {checks[k]:.3g} (must be 0)" for k in ("greedy_mismatches", "state_diff",
                                                                  "sampled_mismatches") if checks[k] != 0]


def add_generation_graph(src_version_dir: str | Path, repo: str | Path | None = None, name: str | None = None,
                         version: int | None = None) -> Path:
    """Publish a NEW version: src's model.onnx, sequence.onnx and model.json plus a checked generate.onnx."""
    src = Path(src_version_dir)
    try:
        meta = verify_version_dir(src)
    except ModelFormatError as e:
        raise ExportError(f"{src}: not a valid version: {e}") from None
    name = check_name(name or meta.name)
    step_bytes = (src / STEP_FILE).read_bytes()
    proto = generate_from_step(step_bytes)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{name}: onnx.checker rejects {GENERATE_FILE}: {e}") from None
    blob = proto.SerializeToString()
    checks = generate_parity(open_session(step_bytes), open_session(blob), meta.initial_state_array())
    failed = parity_failures(checks)
    if failed:
        raise ExportError(f"{name}: parity check failed: {'; '.join(failed)}")
    raw = copy.deepcopy(dict(meta.raw))
    raw["name"] = name
    raw["files"] = {**raw["files"], GENERATE_FILE: sha256_bytes(blob)}
    raw["checks"] = {**raw.get("checks", {}), **{f"generate_{k}": float(v) for k, v in checks.items()}}
    raw["source"] = {**raw["source"], "derived_from": {"name": meta.name, "version": meta.version,
                                                       "path": str(src.resolve())}}
    name_dir = Path(repo if repo is not None else src.parent.parent) / name
    blobs = {fname: (src / fname).read_bytes() for fname in (STEP_FILE, SEQUENCE_FILE)}
    return write_version(name_dir, {**blobs, GENERATE_FILE: blob}, raw, version)


def main(argv: Sequence[str] | None = None) -> int:
    """python -m rnnserve.trainer.gen_graph add REPO/NAME/VERSION [--repo R] [--name N] [--version V]."""
    ap = argparse.ArgumentParser(prog="python -m rnnserve.trainer.gen_graph",
                                 description="Publish a new version of a model with a generation graph.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help=f"a new version: a version's graphs and model.json plus {GENERATE_FILE}")
    add.add_argument("src", type=Path, help="the version to start from, REPO/NAME/VERSION (left unchanged)")
    add.add_argument("--repo", type=Path, help="repository to publish into (default: the source's)")
    add.add_argument("--name", help="model name to publish as (default: the source's)")
    add.add_argument("--version", type=int, help="version number (default: the next free one)")
    args = ap.parse_args(argv)
    try:
        path = add_generation_graph(args.src, args.repo, args.name, args.version)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""generate.onnx: greedy parity with model.onnx, sampling statistics (and that they catch an off-by-one), row
independence, shapes, the contract, building from a published model.onnx, the shipped models."""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import TINY_MODELS, TINY_TEXT, tiny_model
from rnnserve.server.contract import (
    GENERATE_FILE,
    ModelFormatError,
    open_session,
    sha256_file,
    verify_version_dir,
)
from rnnserve.server.sampling import GREEDY_BELOW, sample
from rnnserve.trainer import gen_graph as gg
from rnnserve.trainer import onnx_graph as og
from rnnserve.trainer.export import export_model
from rnnserve.trainer.publish import ExportError

ROOT = Path(__file__).resolve().parents[1]
VOCAB = sorted(set(TINY_TEXT))
V = len(VOCAB)
CELLS = {"elman": (24, 1, "learned"), "gru": (16, 2, "zeros"), "lstm": (16, 2, "learned")}  # H, layers, h0
DRAWS = 20_000
Z_1E4 = 3.719  # upper 1e-4 quantile of the standard normal

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Graphs:
    """One tiny model's step and generation graphs, with sessions."""

    def __init__(self, cell: str) -> None:
        hidden, layers, h0 = CELLS[cell]
        self.model = tiny_model(cell, hidden, layers, h0, 5, V)
        self.step_proto = og.build_step(self.model, VOCAB)
        self.step = open_session(self.step_proto.SerializeToString())
        self.gen = open_session(gg.build_generate(self.model, VOCAB).SerializeToString())
        self.h0 = self.model.h0.detach().numpy()  # (S,)


@pytest.fixture(scope="module")
def graphs() -> dict[str, Graphs]:
    return {cell: Graphs(cell) for cell in CELLS}


def rows(settings: list[tuple[float, int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(temperature, top_k, top_p) per row -> the three (B,) arrays generate.onnx takes."""
    t, k, p = zip(*settings)
    return np.array(t, np.float32), np.array(k, np.int64), np.array(p, np.float32)


def start(g: Graphs, B: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(state (B, S), logits (B, V)) after one random token from a random state per row."""
    r = np.random.default_rng(seed)
    state = r.uniform(-1, 1, (B, g.h0.size)).astype(np.float32)
    logits, state = g.step.run(None, {"tokens": r.integers(0, V, B), "state": state})
    return state, logits


def run(gen: ort.InferenceSession, state: np.ndarray, logits: np.ndarray, u: np.ndarray,
        settings: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[np.ndarray]:
    t, k, p = settings
    feeds = {"state": state, "logits": logits, "uniforms": u, "temperature": t, "top_k": k, "top_p": p}
    return gen.run(None, feeds)  # tokens (B, K), state_out (B, S), logits_out (B, V)


# -- (1) greedy: bitwise a loop of model.onnx with argmax ----------------------------------------------------

@pytest.mark.parametrize("cell", list(CELLS))
def test_greedy_is_the_step_loop_bitwise(graphs: dict[str, Graphs], cell: str) -> None:
    g = graphs[cell]
    settings = rows([(0.0, 0, 0.0), (GREEDY_BELOW, 3, 0.5), (-1.0, 0, 0.9)])  # all greedy, filters ignored
    logits0, state0 = g.step.run(None, {"tokens": np.array([0, 7, 14]), "state": np.tile(g.h0, (3, 1))})
    u = np.random.default_rng(1).random((3, 64), dtype=np.float32)
    tokens, state_out, logits_out = run(g.gen, state0, logits0, u, settings)
    state, logits, want = state0, logits0, []
    for _ in range(64):
        tok = np.argmax(logits, axis=1)
        want.append(tok)
        logits, state = g.step.run(None, {"tokens": tok, "state": state})
    assert np.array_equal(tokens, np.stack(want, axis=1))
    assert np.array_equal(state_out, state) and np.array_equal(logits_out, logits)


# -- (2) sampling statistics: chi-square against the probabilities sampling.py implies -----------------------

def expected_probs(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    """The distribution server/sampling.py draws from for one row (float64): (V,) -> (V,)."""
    if t <= GREEDY_BELOW:
        return np.eye(len(logits))[np.argmax(logits)]
    w = np.exp((logits - logits.max()) / t)
    k = len(w) if k <= 0 or k >= len(w) else k
    if k == len(w) and (p <= 0 or p >= 1):
        return w / w.sum()
    order = np.argsort(-w, kind="stable")
    ws = w[order]
    ws[k:] = 0.0
    if 0 < p < 1:
        ws[(np.cumsum(ws) - ws) / ws.sum() >= p] = 0.0  # keep a token if the mass before it is < top_p
    q = np.zeros_like(w)
    q[order] = ws / ws.sum()
    return q


def chi_square(tokens: np.ndarray, q: np.ndarray) -> tuple[float, float]:
    """(statistic, its critical value at 1e-4) of token counts against q; cells under 5 expected are pooled,
    and a draw of a zero-probability token makes the statistic infinite."""
    counts = np.bincount(tokens, minlength=len(q)).astype(np.float64)
    if counts[q == 0].any():
        return float("inf"), 0.0
    e = len(tokens) * q
    big = e >= 5
    obs = np.append(counts[big], counts[~big & (q > 0)].sum())
    exp = np.append(e[big], e[~big & (q > 0)].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    df = len(exp) - 1
    assert df >= 1
    crit = df * (1 - 2 / (9 * df) + Z_1E4 * np.sqrt(2 / (9 * df))) ** 3  # Wilson-Hilferty
    return float(((obs - exp) ** 2 / exp).sum()), float(crit)


# a fixed distribution: probabilities 0.8^rank, the ranks shuffled so sorted order is not vocabulary order
LOGITS = np.random.default_rng(11).permutation(V).astype(np.float32) * np.float32(np.log(0.8))  # (V,)
SETTINGS = {"T=1": (1.0, 0, 0.0), "T=0.5": (0.5, 0, 1.0), "top_k=5": (1.0, 5, 0.0),
            "top_p=0.7": (0.9, 0, 0.7), "top_k=12,top_p=0.5": (1.5, 12, 0.5)}


def draws(gen: ort.InferenceSession, setting: tuple[float, int, float], seed: int = 3) -> np.ndarray:
    """DRAWS tokens of one step from LOGITS with fixed uniforms: (DRAWS,)."""
    u = np.random.default_rng(seed).random((DRAWS, 1), dtype=np.float32)  # (B, 1)
    settings = rows([setting] * DRAWS)
    state = np.zeros((DRAWS, gen.get_inputs()[0].shape[1]), np.float32)
    return run(gen, state, np.tile(LOGITS, (DRAWS, 1)), u, settings)[0][:, 0]


def test_chi_square_of_the_reference_itself() -> None:
    """expected_probs is what server/sampling.py draws from: its own draws pass the same test."""
    u = np.random.default_rng(3).random(DRAWS)
    for name, (t, k, p) in SETTINGS.items():
        got = sample(np.tile(LOGITS, (DRAWS, 1)), np.full(DRAWS, t), np.full(DRAWS, k), np.full(DRAWS, p), u)
        stat, crit = chi_square(got, expected_probs(LOGITS.astype(np.float64), t, k, p))
        assert stat < crit, (name, stat, crit)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_chi_square_per_setting(graphs: dict[str, Graphs], name: str) -> None:
    t, k, p = SETTINGS[name]
    tokens = draws(graphs["elman"].gen, SETTINGS[name])
    q = expected_probs(LOGITS.astype(np.float64), t, k, p)
    stat, crit = chi_square(tokens, q)
    assert stat < crit, (name, stat, crit)
    # with the same uniforms, sampling.py's very tokens (but where a uniform lies within 1e-5 of a boundary)
    u = np.random.default_rng(3).random((DRAWS, 1), dtype=np.float32)
    gen, step = graphs["elman"].gen, graphs["elman"].step
    state = np.zeros((DRAWS, gen.get_inputs()[0].shape[1]), np.float32)
    checks = gg.replay(step, gen, state, np.tile(LOGITS, (DRAWS, 1)), u, *rows([SETTINGS[name]] * DRAWS))
    assert checks["mismatches"] == 0, checks


def _exclusive_cdf(e: gg._Emit, weights: str, u_col: str) -> tuple[str, str, str]:
    """BROKEN: the cumulative sum one position late (exclusive)."""
    cdf = e.one("CumSum", weights, "gen.axis1", exclusive=1)
    total = e.one("Gather", cdf, "gen.last", axis=1)
    return gg._count(e, e.one("LessOrEqual", cdf, e.one("Mul", u_col, total))), cdf, total


def _keeps_k_plus_one(e: gg._Emit, k: str) -> str:
    """BROKEN: top-k keeps k + 1."""
    return e.one("Min", e.one("Add", k, "gen.one_i"), "gen.v")


def _nucleus_inclusive(e: gg._Emit, p: str, p_col: str, nucleus_col: str) -> str:
    """BROKEN: top-p drops a token when the mass up to and including it is >= top_p (one too few)."""
    mass = e.one("Div", e.one("CumSum", p, "gen.axis1"), e.one("ReduceSum", p, "gen.axes1", keepdims=1))
    return e.one("Where", e.one("And", e.one("GreaterOrEqual", mass, p_col), nucleus_col), "gen.zero_f", p)


# broken helper -> (what it replaces, the settings whose chi-square it must fail)
BROKEN: dict[str, tuple[str, Callable, list[str]]] = {
    "cumsum": ("_inverse_cdf", _exclusive_cdf, list(SETTINGS)),
    "top_k": ("_top_k_keeps", _keeps_k_plus_one, ["top_k=5"]),
    "top_p": ("_nucleus", _nucleus_inclusive, ["top_p=0.7", "top_k=12,top_p=0.5"]),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_chi_square_catches_an_off_by_one(graphs: dict[str, Graphs], monkeypatch: pytest.MonkeyPatch,
                                          fault: str) -> None:
    helper_name, broken, must_fail = BROKEN[fault]
    monkeypatch.setattr(gg, helper_name, broken)
    gen = open_session(gg.generate_from_step(graphs["elman"].step_proto).SerializeToString())
    for name in must_fail:
        t, k, p = SETTINGS[name]
        q = expected_probs(LOGITS.astype(np.float64), t, k, p)
        stat, crit = chi_square(draws(gen, SETTINGS[name]), q)
        assert stat > crit, (fault, name, stat, crit)


@pytest.mark.parametrize("fault", list(BROKEN))
def test_export_refuses_a_broken_sampler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    helper_name, broken, _ = BROKEN[fault]
    monkeypatch.setattr(gg, helper_name, broken)
    with pytest.raises(ExportError, match="generate sampled_mismatches"):
        export_model(tiny_model("elman", 16, 1, "zeros", 2, V), VOCAB, tmp_path, "m")
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())  # nothing published


# -- (3) rows are independent; (4) shapes --------------------------------------------------------------------

MIXED = [(0.0, 0, 0.0), (1.0, 0, 0.0), (0.7, 4, 0.0), (1.2, 0, 0.8), (0.9, 9, 0.6)]


@pytest.mark.parametrize("cell", list(CELLS))
def test_rows_are_independent(graphs: dict[str, Graphs], cell: str) -> None:
    g = graphs[cell]
    state, logits = start(g, 5, seed=2)
    u = np.random.default_rng(4).random((5, 32), dtype=np.float32)
    tokens, state_out, logits_out = run(g.gen, state, logits, u, rows(MIXED))
    rev = slice(None, None, -1)
    r_tokens, r_state, _ = run(g.gen, state[rev], logits[rev], u[rev], rows(MIXED[rev]))
    assert np.array_equal(r_tokens[rev], tokens) and np.allclose(r_state[rev], state_out, atol=1e-6)
    for r in range(5):
        one = run(g.gen, state[r:r + 1], logits[r:r + 1], u[r:r + 1], rows(MIXED[r:r + 1]))
        assert np.array_equal(one[0][0], tokens[r]), (cell, r)
        assert np.allclose(one[1][0], state_out[r], atol=1e-6)
        assert np.allclose(one[2][0], logits_out[r], atol=1e-5)


@pytest.mark.parametrize("B,K", [(1, 1), (1, 64), (5, 1), (5, 64)])
@pytest.mark.parametrize("cell", list(CELLS))
def test_shapes_and_replay(graphs: dict[str, Graphs], cell: str, B: int, K: int) -> None:
    g = graphs[cell]
    state, logits = start(g, B, seed=B * K)
    u = np.random.default_rng(K).random((B, K), dtype=np.float32)
    settings = rows([MIXED[(i + 1) % len(MIXED)] for i in range(B)])
    tokens, state_out, logits_out = run(g.gen, state, logits, u, settings)
    assert tokens.shape == (B, K) and tokens.dtype == np.int64 and ((tokens >= 0) & (tokens < V)).all()
    assert state_out.shape == state.shape and logits_out.shape == logits.shape
    checks = gg.replay(g.step, g.gen, state, logits, u, *settings)
    assert checks["mismatches"] == 0 and checks["state_diff"] == 0, checks


def test_zero_steps_return_the_inputs(graphs: dict[str, Graphs]) -> None:
    g = graphs["gru"]
    state, logits = start(g, 3, seed=0)
    tokens, state_out, logits_out = run(g.gen, state, logits, np.zeros((3, 0), np.float32), rows(MIXED[:3]))
    assert tokens.shape == (3, 0) and np.array_equal(state_out, state) and np.array_equal(logits_out, logits)


# -- (5) the contract ----------------------------------------------------------------------------------------

def _reseal(d: Path, fname: str) -> None:
    meta = json.loads((d / "model.json").read_text())
    meta["files"][fname] = sha256_file(d / fname)
    (d / "model.json").write_text(json.dumps(meta))


@pytest.fixture
def version_dir(tiny_repo: Path, tmp_path: Path) -> Path:
    d = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repo / "tiny" / "1", d)
    return d


def test_export_writes_and_lists_it(version_dir: Path) -> None:
    meta = verify_version_dir(version_dir)
    assert GENERATE_FILE in meta.onnx_files
    assert meta.files[GENERATE_FILE] == sha256_file(version_dir / GENERATE_FILE)
    for k in ("greedy_mismatches", "sampled_mismatches", "state_diff"):
        assert meta.checks[f"generate_{k}"] == 0
    props = {p.key: p.value for p in onnx.load(version_dir / GENERATE_FILE).metadata_props}
    assert json.loads(props["vocab"]) == list(meta.vocab) and props["cell"] == meta.cell == "elman"


def test_forged_checksum_refused(version_dir: Path) -> None:
    meta = json.loads((version_dir / "model.json").read_text())
    meta["files"][GENERATE_FILE] = hashlib.sha256(b"forged").hexdigest()
    (version_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=f"{GENERATE_FILE}: sha256"):
        verify_version_dir(version_dir)


def test_listed_but_missing_refused(version_dir: Path) -> None:
    (version_dir / GENERATE_FILE).unlink()
    with pytest.raises(ModelFormatError, match=f"{GENERATE_FILE}: missing"):
        verify_version_dir(version_dir)


def test_wrong_io_refused(version_dir: Path) -> None:
    m = onnx.load(version_dir / GENERATE_FILE)
    m.graph.input[5].name = "nucleus"  # top_p renamed
    for node in m.graph.node:
        node.input[:] = ["nucleus" if x == "top_p" else x for x in node.input]
    onnx.save(m, version_dir / GENERATE_FILE)
    _reseal(version_dir, GENERATE_FILE)
    with pytest.raises(ModelFormatError, match="inputs .* break the contract"):
        verify_version_dir(version_dir)


def test_another_models_graph_refused(version_dir: Path) -> None:
    """The same IO, another model's weights: the one greedy step disagrees with model.onnx."""
    other = tiny_model("elman", 32, 1, "learned", 99, V)
    (version_dir / GENERATE_FILE).write_bytes(gg.build_generate(other, VOCAB).SerializeToString())
    _reseal(version_dir, GENERATE_FILE)
    with pytest.raises(ModelFormatError, match=f"{GENERATE_FILE}: (greedy token|its step differs)"):
        verify_version_dir(version_dir)


def test_a_version_without_it_is_valid(version_dir: Path) -> None:
    meta = json.loads((version_dir / "model.json").read_text())
    del meta["files"][GENERATE_FILE]
    (version_dir / "model.json").write_text(json.dumps(meta))
    (version_dir / GENERATE_FILE).unlink()
    assert GENERATE_FILE not in verify_version_dir(version_dir).onnx_files
    meta["files"][GENERATE_FILE] = 7  # listed, it must be a sha256
    (version_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="files must give a sha256"):
        verify_version_dir(version_dir)


# -- (6) from a published model.onnx: the same graph ---------------------------------------------------------

def test_from_published_step_equals_build_generate(tiny_repo: Path) -> None:
    for name, cell, hidden, layers, init_state, seed in TINY_MODELS:
        d = tiny_repo / name / "1"
        from_file = gg.generate_from_step((d / "model.onnx").read_bytes()).SerializeToString()
        model = tiny_model(cell, hidden, layers, init_state, seed, V)
        built = gg.build_generate(model, VOCAB).SerializeToString()
        assert from_file == built == (d / GENERATE_FILE).read_bytes(), name
    a, b = open_session(from_file), open_session(built)
    state = np.zeros((2, a.get_inputs()[0].shape[1]), np.float32)
    logits = np.random.default_rng(0).normal(size=(2, V)).astype(np.float32)
    u = np.random.default_rng(1).random((2, 16), dtype=np.float32)
    for x, y in zip(run(a, state, logits, u, rows(MIXED[1:3])), run(b, state, logits, u, rows(MIXED[1:3]))):
        assert np.array_equal(x, y)


# -- (7) the shipped models ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["shakespeare", "shakespeare-lstm"])
def test_shipped_model_gets_a_generation_graph(name: str) -> None:
    d = ROOT / "models" / name / "1"
    meta = verify_version_dir(d)
    step_bytes = (d / "model.onnx").read_bytes()
    proto = gg.generate_from_step(step_bytes)
    onnx.checker.check_model(proto, full_check=True)
    step, gen = open_session(step_bytes), open_session(proto.SerializeToString())
    state = np.tile(meta.initial_state_array(), (2, 1))  # (2, S)
    logits, state = step.run(None, {"tokens": np.array([0, 40]), "state": state})
    u = np.random.default_rng(0).random((2, 24), dtype=np.float32)
    checks = gg.replay(step, gen, state, logits, u, *rows([(0.8, 0, 0.9), (0.0, 0, 0.0)]))
    assert checks["mismatches"] == 0 and checks["state_diff"] == 0, checks


def test_add_generation_graph_publishes_a_new_version(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = ROOT / "models" / "shakespeare" / "1"
    before = {f.name: sha256_file(f) for f in src.iterdir()}
    copy = tmp_path / "repo" / "shakespeare" / "1"
    shutil.copytree(src, copy)
    # the shipped version already carries generate.onnx: take it out to stand for an older export
    meta_json = json.loads((copy / "model.json").read_text())
    if meta_json["files"].pop(GENERATE_FILE, None) is not None:
        (copy / GENERATE_FILE).unlink()
        (copy / "model.json").write_text(json.dumps(meta_json, indent=2) + "\n")
    verify_version_dir(copy)
    source_json = (copy / "model.json").read_bytes()
    assert gg.main(["add", str(copy)]) == 0
    new = Path(capsys.readouterr().out.strip())
    assert new == tmp_path / "repo" / "shakespeare" / "2"
    meta = verify_version_dir(new)
    assert meta.version == 2 and GENERATE_FILE in meta.onnx_files
    assert meta.source["derived_from"]["version"] == 1
    for fname in ("model.onnx", "sequence.onnx"):
        assert (new / fname).read_bytes() == (copy / fname).read_bytes()
    assert (copy / "model.json").read_bytes() == source_json  # source untouched
    assert not (copy / GENERATE_FILE).exists()
    assert {f.name: sha256_file(f) for f in src.iterdir()} == before  # and models/ was only read
    # into another repository under another name, then a refusal that leaves nothing behind
    other = gg.add_generation_graph(copy, tmp_path / "other", "bard", version=3)
    assert other == tmp_path / "other" / "bard" / "3" and verify_version_dir(other).name == "bard"
    with pytest.raises(ExportError, match="never overwritten"):
        gg.add_generation_graph(copy, tmp_path / "other", "bard", version=3)
    assert sorted(p.name for p in (tmp_path / "other" / "bard").iterdir()) == ["3"]


def test_edges_of_the_uniforms_and_ties(graphs: dict[str, Graphs]) -> None:
    """u = 0, the largest float32 below 1 and 1 itself (a float64 uniform rounded up) give sampling.py's
    token; a tiny temperature neither overflows nor is greedy; equal logits sort by token id (stable)."""
    g = graphs["elman"]
    settings = [(1.0, 0, 0.0), (0.8, 7, 0.0), (1.1, 0, 0.6), (2e-6, 0, 0.0), (2e-6, 3, 0.9)]
    B = len(settings)
    state, logits = start(g, B, seed=9)
    for u0 in (0.0, np.nextafter(np.float32(1), np.float32(0)), 1.0):
        u = np.full((B, 1), u0, np.float32)
        t, k, p = rows(settings)
        tokens = run(g.gen, state, logits, u, (t, k, p))[0][:, 0]
        assert np.array_equal(tokens, sample(logits, t.astype(np.float64), k, p.astype(np.float64), u[:, 0]))
    flat = np.zeros((DRAWS, V), np.float32)  # every token equally likely
    u = np.random.default_rng(5).random((DRAWS, 1), dtype=np.float32)
    state = np.zeros((DRAWS, g.h0.size), np.float32)
    tokens = run(g.gen, state, flat, u, rows([(1.0, 3, 0.0)] * DRAWS))[0][:, 0]
    counts = np.bincount(tokens, minlength=V)
    assert counts[3:].sum() == 0 and np.abs(counts[:3] / DRAWS - 1 / 3).max() < 0.02  # ids 0, 1, 2 kept


def test_replay_excuses_ties_only(graphs: dict[str, Graphs]) -> None:
    """Equal logits may sort either way in numpy: the replay counts those apart, and finds no mismatch."""
    g, n = graphs["elman"], 4000
    r = np.random.default_rng(8)
    logits = (r.normal(size=(n, V)) * 3).astype(np.float32)
    logits[:, 1:6] = logits[:, :1]  # five equal logits in every row
    settings = rows([MIXED[1 + i % 4] for i in range(n)])
    u = r.random((n, 1), dtype=np.float32)
    checks = gg.replay(g.step, g.gen, np.zeros((n, g.h0.size), np.float32), logits, u, *settings)
    assert checks["mismatches"] == 0 and checks["state_diff"] == 0, checks

"""ONNX export: parity of all three cells, the contract, refusal of damaged files, atomicity, the CLI."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_checkpoint, tiny_model
from rnnserve.server.contract import (
    REQUIRED_KEYS,
    ModelFormatError,
    open_session,
    sha256_file,
    verify_version_dir,
)
from rnnserve.trainer import onnx_graph as og
from rnnserve.trainer.export import export_model
from rnnserve.trainer.publish import ExportError

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# The models shipped in models/: (name, cell, the validation loss the README promises for it).
SHIPPED = [("shakespeare", "elman", 1.50), ("shakespeare-lstm", "lstm", 1.42)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "rnn-export"), *args], check=False, capture_output=True, text=True, timeout=120, cwd=cwd)


def versions(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


@pytest.mark.parametrize("cell,layers,init", [("elman", 1, "learned"), ("elman", 2, "zeros"), ("gru", 1, "zeros"),
                                              ("gru", 2, "learned"), ("lstm", 1, "learned"), ("lstm", 2, "zeros")])
def test_parity_against_torch(tmp_path: Path, tiny_text: str, cell: str, layers: int, init: str) -> None:
    vocab = sorted(set(tiny_text))
    model = tiny_model(cell, 24, layers, init, 7, len(vocab))
    path = export_model(model, vocab, tmp_path, "m")
    meta = verify_version_dir(path)
    assert meta["checks"]["step"] <= 1e-5 and meta["checks"]["sequence_vs_step"] <= 1e-4
    assert meta["state_size"] == (2 if cell == "lstm" else 1) * 24 * layers
    assert np.allclose(meta["initial_state"], model.h0.detach().numpy(), atol=0)
    if init == "learned":
        assert np.abs(meta["initial_state"]).max() > 0.1
    step, seq = open_session(path / "model.onnx"), open_session(path / "sequence.onnx")
    g = np.random.default_rng(3)
    tokens = g.integers(0, len(vocab), size=(5, 40))  # (B, T)
    state = np.tile(np.asarray(meta["initial_state"], np.float32), (5, 1))  # (B, S)
    with torch.no_grad():
        t_logits, t_state = model(torch.from_numpy(tokens), torch.from_numpy(state))
        s_logits, s_state = model.step(torch.from_numpy(tokens[:, 0]), torch.from_numpy(state))
    o_logits, o_state = step.run(None, {"tokens": tokens[:, 0], "state": state})
    assert np.abs(o_logits - s_logits.numpy()).max() <= 1e-5 and np.abs(o_state - s_state.numpy()).max() <= 1e-5
    q_logits, q_state = seq.run(None, {"tokens": tokens, "state": state})
    assert q_logits.shape == (5, 40, len(vocab)) and q_state.shape == state.shape
    assert np.abs(q_logits - t_logits.numpy()).max() <= 1e-4 and np.abs(q_state - t_state.numpy()).max() <= 1e-4
    # chunking carries state exactly: two halves equal the whole
    a_logits, mid = seq.run(None, {"tokens": tokens[:, :17], "state": state})
    b_logits, end = seq.run(None, {"tokens": tokens[:, 17:], "state": mid})
    assert np.abs(np.concatenate([a_logits, b_logits], 1) - q_logits).max() <= 1e-5
    assert np.abs(end - q_state).max() <= 1e-5


def test_contract_of_tiny_repo(tiny_repo: Path, tiny_text: str) -> None:
    vocab = sorted(set(tiny_text))
    for name, cell in (("tiny", "elman"), ("tiny-lstm", "lstm"), ("tiny-gru", "gru")):
        d = tiny_repo / name / "1"
        meta = json.loads((d / "model.json").read_text())
        assert set(REQUIRED_KEYS) <= set(meta) and meta["version"] == 1 and meta["name"] == name
        assert meta["cell"] == cell and meta["vocab"] == vocab and meta["opset"] == 17 and meta["ir_version"] == 8
        assert set(meta["metrics"]) >= {"val_loss", "steps", "tokens", "wall_time_s"}
        assert 2.5 < meta["metrics"]["val_loss"] < 4.5  # untrained: about ln(len(vocab)) nats/char
        for fname, (ins, outs) in {"model.onnx": (["tokens", "state"], ["logits", "state_out"]),
                                   "sequence.onnx": (["tokens", "state"], ["logits", "state_out"])}.items():
            assert meta["files"][fname] == sha256_file(d / fname)
            proto = onnx.load(d / fname)
            assert proto.ir_version == 8 and [(o.domain, o.version) for o in proto.opset_import] == [("", 17)]
            props = {p.key: p.value for p in proto.metadata_props}
            assert json.loads(props["vocab"]) == vocab and props["cell"] == cell
            assert int(props["state_size"]) == meta["state_size"]
            sess = ort.InferenceSession(str(d / fname), providers=["CPUExecutionProvider"])
            assert [i.name for i in sess.get_inputs()] == ins and [o.name for o in sess.get_outputs()] == outs
            assert [i.type for i in sess.get_inputs()] == ["tensor(int64)", "tensor(float)"]
            dims = [i.shape for i in sess.get_inputs()]
            assert isinstance(dims[0][0], str) and (fname == "model.onnx" or isinstance(dims[0][1], str))
    assert json.loads((tiny_repo / "tiny-lstm" / "1" / "model.json").read_text())["state_size"] == 64


def _unread_initializers(path: Path) -> list[str]:
    """Initializers of an ONNX file that no node reads, subgraphs (Scan and Loop bodies) included."""
    proto = onnx.load(path)
    read: set[str] = set()
    graphs = [proto.graph]
    while graphs:
        g = graphs.pop()
        for n in g.node:
            read.update(n.input)
            graphs += [a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH]
            graphs += [x for a in n.attribute for x in a.graphs]
    return sorted(t.name for t in proto.graph.initializer if t.name not in read)


def test_graphs_carry_no_unread_initializers(tiny_repo: Path) -> None:
    """No graph holds a constant that no node reads (onnxruntime warns about each one at every load): neither
    a fresh export of each cell kind nor the shipped versions."""
    dirs = [tiny_repo / name / "1" for name in ("tiny", "tiny-lstm", "tiny-gru")]
    dirs += [d for d in (ROOT / "models").glob("*/1")]
    files = [f for d in dirs for f in sorted(d.glob("*.onnx"))]
    assert len(files) >= 3 * 2 + 3  # model.onnx and sequence.onnx of three cells at least, and the shipped ones
    unread = {str(f.relative_to(f.parents[2])): _unread_initializers(f) for f in files}
    assert {f: names for f, names in unread.items() if names} == {}


def test_builds_are_deterministic(tiny_text: str) -> None:
    vocab = sorted(set(tiny_text))
    model = tiny_model("gru", 16, 2, "zeros", 5, len(vocab))
    assert og.build_sequence(model, vocab).SerializeToString() == og.build_sequence(model, vocab).SerializeToString()
    assert og.content_hash(model, vocab) == og.content_hash(tiny_model("gru", 16, 2, "zeros", 5, len(vocab)), vocab)
    assert og.content_hash(model, vocab) != og.content_hash(tiny_model("gru", 16, 2, "zeros", 6, len(vocab)), vocab)


@pytest.fixture
def version_dir(tiny_repo: Path, tmp_path: Path) -> Path:
    d = tmp_path / "tiny" / "1"
    shutil.copytree(tiny_repo / "tiny" / "1", d)
    return d


def _reseal(d: Path, fname: str) -> None:
    """Update model.json's checksum so the file's content, not its checksum, is what is tested."""
    meta = json.loads((d / "model.json").read_text())
    meta["files"][fname] = sha256_file(d / fname)
    (d / "model.json").write_text(json.dumps(meta))


def test_corrupt_file_refused_by_checksum(version_dir: Path) -> None:
    data = bytearray((version_dir / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (version_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"model\.onnx: sha256 .* does not match"):
        verify_version_dir(version_dir)


def test_truncated_file_refused(version_dir: Path) -> None:
    f = version_dir / "sequence.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"sequence\.onnx: sha256"):
        verify_version_dir(version_dir)
    _reseal(version_dir, "sequence.onnx")  # even with a matching checksum it cannot load
    with pytest.raises(ModelFormatError, match=r"sequence\.onnx: onnxruntime cannot load it"):
        verify_version_dir(version_dir)


def test_not_onnx_refused(version_dir: Path) -> None:
    (version_dir / "model.onnx").write_bytes(b"\x08\x08this is not a model, just text\n")
    _reseal(version_dir, "model.onnx")
    with pytest.raises(ModelFormatError, match=r"model\.onnx: onnxruntime cannot load it"):
        verify_version_dir(version_dir)


def test_wrong_contract_refused(version_dir: Path, tiny_repo: Path) -> None:
    meta = json.loads((version_dir / "model.json").read_text())
    meta["state_size"] += 1
    meta["initial_state"].append(0.0)
    (version_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"model\.onnx: input state has last axis 32"):
        verify_version_dir(version_dir)
    shutil.copy(tiny_repo / "tiny-gru" / "1" / "model.onnx", version_dir / "model.onnx")  # another model's graph
    meta["state_size"] -= 1
    meta["initial_state"].pop()
    meta["files"]["model.onnx"] = sha256_file(version_dir / "model.onnx")
    (version_dir / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"model\.onnx: (input state has last axis 16|.*cell)"):
        verify_version_dir(version_dir)


def test_bad_model_json_refused(version_dir: Path) -> None:
    (version_dir / "model.json").write_text('{"name": "tiny"')
    with pytest.raises(ModelFormatError, match=r"model\.json: not valid JSON"):
        verify_version_dir(version_dir)
    (version_dir / "model.json").write_text('{"name": "tiny", "version": 1}')
    with pytest.raises(ModelFormatError, match=r"model\.json: lacks cell, vocab"):
        verify_version_dir(version_dir)
    (version_dir / "model.json").unlink()
    with pytest.raises(ModelFormatError, match=r"model\.json: missing"):
        verify_version_dir(version_dir)


def test_failed_parity_writes_nothing(tmp_path: Path, tiny_text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = sorted(set(tiny_text))
    model = tiny_model("lstm", 16, 1, "zeros", 4, len(vocab))
    real = og.fold_table
    monkeypatch.setattr(og, "fold_table", lambda m: real(m) + np.float32(1e-3))  # a subtly wrong graph
    with pytest.raises(ExportError, match="parity check failed: step max abs diff"):
        export_model(model, vocab, tmp_path, "bad")
    assert versions(tmp_path / "bad") == []  # no version, no temporary folder
    monkeypatch.undo()
    with torch.no_grad():
        model.head.bias[3] = float("nan")
    with pytest.raises(ExportError, match="head.bias holds NaN"):
        export_model(model, vocab, tmp_path, "bad")
    assert versions(tmp_path / "bad") == []


def test_bad_inputs_refused(tmp_path: Path, tiny_text: str) -> None:
    vocab = sorted(set(tiny_text))
    model = tiny_model("elman", 8, 1, "zeros", 0, len(vocab))
    with pytest.raises(ExportError, match="model name"):
        export_model(model, vocab, tmp_path, "../escape")
    with pytest.raises(ExportError, match="vocab must be"):
        export_model(model, vocab[:-1], tmp_path, "m")
    with pytest.raises(ExportError, match="outside the vocabulary"):
        export_model(model, vocab, tmp_path, "m", eval_text="\u00e9" * 50 + tiny_text)
    assert export_model(model, vocab, tmp_path, "m", version=3).name == "3"
    with pytest.raises(ExportError, match="already exists"):
        export_model(model, vocab, tmp_path, "m", version=3)
    assert versions(tmp_path / "m") == ["3"]


def test_versions_never_clash(tmp_path: Path, tiny_text: str) -> None:
    vocab = sorted(set(tiny_text))
    dead = tmp_path / "m" / f".tmp-{socket.gethostname()}-{2**22 + 12345}-deadbeef0000"  # a killed exporter's
    dead.mkdir(parents=True)
    live = tmp_path / "m" / f".tmp-{socket.gethostname()}-{os.getpid()}-live00000000"
    live.mkdir()
    models = [tiny_model("elman", 8, 1, "zeros", s, len(vocab)) for s in range(4)]
    got: list[Path] = []
    threads = [threading.Thread(target=lambda m=m: got.append(export_model(m, vocab, tmp_path, "m"))) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name for p in got) == ["1", "2", "3", "4"]
    assert sorted({verify_version_dir(p)["source"]["content_sha256"] for p in got}) == sorted(
        og.content_hash(m, vocab) for m in models)
    assert not dead.exists() and live.exists()  # stale temporaries are cleaned, a live exporter's is not


def test_onnx_val_loss_matches_torch(tiny_repo: Path, tiny_text: str) -> None:
    from conftest import TINY_MODELS

    vocab = sorted(set(tiny_text))
    name, cell, hidden, layers, init, seed = TINY_MODELS[0]
    model = tiny_model(cell, hidden, layers, init, seed, len(vocab))
    ids = torch.tensor([vocab.index(c) for c in tiny_text])
    val = ids[-max(2, int(len(ids) * 0.1)):]
    with torch.no_grad():
        logits, _ = model(val[None, :-1])  # from the learned initial state
        want = float(F.cross_entropy(logits[0], val[1:]))
    got = json.loads((tiny_repo / name / "1" / "model.json").read_text())["metrics"]["val_loss"]
    assert abs(got - want) < 1e-5


@pytest.mark.parametrize("name,cell,goal", SHIPPED)
def test_shipped_model_meets_its_validation_goal(name: str, cell: str, goal: float) -> None:
    """The shipped version loads as a server checks it, and onnxruntime re-measures the loss it states."""
    folder = ROOT / "models" / name / "1"
    meta = verify_version_dir(folder)
    assert meta["cell"] == cell
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    opts = ort.SessionOptions()  # two threads: the same numbers, about half the wall time of one (LSTM 47 -> 27 s)
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 2, 1, 3
    got = og.onnx_val_loss(open_session(folder / "sequence.onnx", opts), text, meta["vocab"],
                           np.asarray(meta["initial_state"], dtype=np.float32))
    assert got == pytest.approx(meta["metrics"]["val_loss"], abs=1e-4)
    assert got <= goal


def test_verify_is_torch_free() -> None:
    code = ("import sys, rnnserve.server.contract as e; bad = sorted({'torch', 'onnx'} & set(sys.modules)); "
            "print(bad, file=sys.stderr); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr  # a server can share it without torch or onnx installed


def test_cli_errors(tmp_path: Path, tiny_text: str) -> None:
    r = run_cli(str(tmp_path / "nope.pt"), "--repo", str(tmp_path / "repo"), "--name", "x")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    r = run_cli(str(tmp_path / "junk.pt"), "--repo", str(tmp_path / "repo"))
    assert r.returncode == 2 and "cannot be read" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "repo").exists() or versions(tmp_path / "repo") == []
    r = run_cli("--repo", str(tmp_path))
    assert r.returncode == 2 and "checkpoint" in r.stderr


def test_end_to_end_train_save_export_run(tmp_path: Path, tiny_text: str) -> None:
    vocab = sorted(set(tiny_text))
    ids = torch.tensor([vocab.index(c) for c in tiny_text])  # (N,)
    model = tiny_model("gru", 32, 1, "learned", 11, len(vocab)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.stack([ids[i : i + 64] for i in range(0, 448, 64)])  # (7, 64)
    y = torch.stack([ids[i + 1 : i + 65] for i in range(0, 448, 64)])
    losses = []
    for _ in range(30):
        logits, _ = model(x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.5
    model.eval()
    ckpt = save_tiny_checkpoint(tmp_path / "run" / "ckpt.pt", model, val_loss=2.5, steps=30, tokens=30 * 448,
                                wall_time_s=1.0, train={})
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(tiny_text)
    r = run_cli(str(ckpt), "--repo", str(tmp_path / "models"), "--eval-corpus", str(corpus))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["name"] == "run" and out["version"] == 1  # named after the run folder of ckpt.pt
    meta = verify_version_dir(out["path"])
    assert meta["metrics"]["steps"] == 30 and meta["metrics"]["val_loss_torch"] == 2.5
    assert meta["source"]["checkpoint_sha256"] == sha256_file(ckpt)
    assert meta["metrics"]["val_loss"] < losses[0]  # trained: better than where it started
    step = open_session(Path(out["path"]) / "model.onnx")
    state = np.asarray([meta["initial_state"]], np.float32)
    token, text = np.array([vocab.index("F")]), "F"
    for _ in range(40):  # greedy generation through onnxruntime
        logits, state = step.run(None, {"tokens": token, "state": state})
        token = logits.argmax(-1)
        text += vocab[int(token[0])]
    assert len(text) == 41 and set(text) <= set(vocab)
    r = run_cli(str(ckpt), "--repo", str(tmp_path / "models"), "--version", "1")
    assert r.returncode == 1 and "already exists" in r.stderr

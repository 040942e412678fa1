"""Vector models through the ONNX contract: graph parity (both tasks, all three cells), the contract's checks of
vector model.json, the export CLI, and the shipped JapaneseVowels model re-measured in onnxruntime."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from conftest import INFO, MEAN, STD, vector_model
from rnnserve.server.contract import (
    REQUIRED_KEYS,
    VECTOR_REQUIRED_KEYS,
    ModelFormatError,
    open_session,
    parse_meta,
    read_meta,
    verify_version_dir,
)
from rnnserve.trainer import checkpoint
from rnnserve.trainer import series_graph as sg
from rnnserve.trainer.publish import ExportError
from rnnserve.trainer.series import load_csv
from rnnserve.trainer.series_export import export_series_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The shipped vector model: (name, cell, classes, the held-out accuracy the README states for it).
SHIPPED = ("japanese-vowels", "lstm", [str(k) for k in range(1, 10)], 0.975)


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
@pytest.mark.parametrize("task,layers,init,loss", [("classify", 1, "learned", "nll"), ("forecast", 2, "zeros", "nll"),
                                                   ("forecast", 1, "learned", "mse")])
def test_vector_graphs_match_torch(tmp_path: Path, cell: str, task: str, layers: int, init: str, loss: str) -> None:
    model = vector_model(cell, task, layers, init, seed=7, loss=loss)
    path = export_series_model(model, INFO, tmp_path, "m")
    meta = verify_version_dir(path)
    assert meta.input_kind == "vector" and meta.task == task and meta.features == 3
    assert meta.output_size == {"classify": 4, "nll": 6, "mse": 3}[task if task == "classify" else loss]
    step, seq = open_session(path / "model.onnx"), open_session(path / "sequence.onnx")
    assert [(i.name, i.type, len(i.shape)) for i in seq.get_inputs()] == [("inputs", "tensor(float)", 3),
                                                                         ("state", "tensor(float)", 2)]
    assert [o.name for o in step.get_outputs()] == ["outputs", "state_out"]
    g = np.random.default_rng(3)
    x = (MEAN + STD * g.standard_normal((4, 30, 3))).astype(np.float32)  # raw frames: the graphs normalise
    state = np.tile(meta.initial_state_array(), (4, 1))
    with torch.no_grad():
        t_out, t_state = model(torch.from_numpy(x), torch.from_numpy(state))
        s_out, s_state = model.step(torch.from_numpy(x[:, 0]), torch.from_numpy(state))
    scale = max(1.0, float(t_out.abs().max()))
    o, st = step.run(None, {"inputs": x[:, 0], "state": state})
    assert np.abs(o - s_out.numpy()).max() <= 1e-5 * scale and np.abs(st - s_state.numpy()).max() <= 1e-5
    q, qs = seq.run(None, {"inputs": x, "state": state})
    assert q.shape == (4, 30, meta.output_size)
    assert np.abs(q - t_out.numpy()).max() <= 1e-4 * scale and np.abs(qs - t_state.numpy()).max() <= 1e-4
    a, mid = seq.run(None, {"inputs": x[:, :11], "state": state})  # chunks carry state exactly
    b, end = seq.run(None, {"inputs": x[:, 11:], "state": mid})
    assert np.abs(np.concatenate([a, b], 1) - q).max() <= 1e-5 * scale and np.abs(end - qs).max() <= 1e-5
    if task == "forecast":  # outputs in raw units: the means live where the frames do
        assert abs(float(q[..., :3].mean(axis=(0, 1))[0]) - MEAN[0]) < 5 * STD[0]
        assert meta.forecast_outputs == (("mean", "log_var") if loss == "nll" else ("mean",))


def test_vector_model_json_and_metadata(vector_repo: Path) -> None:
    for name, task in (("cls", "classify"), ("fc", "forecast")):
        d = vector_repo / name / "1"
        meta = json.loads((d / "model.json").read_text())
        assert set(VECTOR_REQUIRED_KEYS) <= set(meta) and "vocab" not in meta and "embed_size" not in meta
        assert meta["input"]["kind"] == "vector" and meta["input"]["names"] == ["a", "b", "c"]
        assert np.allclose(meta["input"]["mean"], MEAN) and np.allclose(meta["input"]["std"], STD)
        assert not (d / "generate.onnx").exists() and set(meta["files"]) == {"model.onnx", "sequence.onnx"}
        props = {p.key: p.value for p in onnx.load(d / "model.onnx").metadata_props}
        assert json.loads(props["input"]) == meta["input"] and json.loads(props["task"]) == meta["task"]
        assert "vocab" not in props and meta["task"]["kind"] == task
    m = read_meta(vector_repo / "cls" / "1")
    assert m.classes == ("w", "x", "y", "z") and m.label_mode == "sequence" and m.vocab == () and m.embed_size is None
    assert m.forecast_outputs == () and m.normalization()[1].dtype == np.float32
    f = read_meta(vector_repo / "fc" / "1")
    assert f.task_spec == {"kind": "forecast", "outputs": ["mean", "log_var"], "output_size": 6, "horizon": 3}
    assert f.classes == () and f.label_mode is None and f.output_size == 6


def test_token_models_keep_their_schema(tiny_repo: Path) -> None:
    """Token model.json is unchanged: the same required keys, no input/task written, the defaults implied."""
    assert REQUIRED_KEYS == ("name", "version", "cell", "vocab", "hidden_size", "state_size", "layers",
                             "embed_size", "initial_state", "files", "opset", "ir_version", "metrics", "source")
    raw = json.loads((tiny_repo / "tiny" / "1" / "model.json").read_text())
    assert "input" not in raw and "task" not in raw
    m = read_meta(tiny_repo / "tiny" / "1")
    assert (m.input_kind, m.task, m.features, m.classes, m.output_size) == ("tokens", "lm", None, (), m.vocab_size)
    assert m.normalization() is None
    raw["input"] = {"kind": "tokens"}
    raw["task"] = {"kind": "lm"}
    assert parse_meta(raw).vocab == m.vocab  # stated explicitly, the same model
    for key, value, problem in (("task", {"kind": "classify"}, "task.kind 'classify' does not fit input.kind 'tokens'"),
                                ("input", {"kind": "tokens", "features": 3}, "input of kind tokens takes no other"),
                                ("input", {"kind": "audio"}, "input must be an object whose kind is one of")):
        with pytest.raises(ModelFormatError, match=problem):
            parse_meta({**raw, key: value})


def _edit(d: Path, change: Any) -> None:
    meta = json.loads((d / "model.json").read_text())
    change(meta)
    (d / "model.json").write_text(json.dumps(meta))


BAD_VECTOR_JSON = {
    "no-normalisation": (lambda m: m["input"].pop("std"), r"input\.std must be a list of 3 finite numbers"),
    "short-mean": (lambda m: m["input"]["mean"].pop(), r"input\.mean must be a list of 3 finite numbers"),
    "zero-std": (lambda m: m["input"]["std"].__setitem__(1, 0.0), r"input\.std must be positive"),
    "nan-mean": (lambda m: m["input"]["mean"].__setitem__(0, float("nan")), r"input\.mean must be a list of 3 finite"),
    "no-features": (lambda m: m["input"].pop("features"), r"input\.features must be a positive integer"),
    "names": (lambda m: m["input"].__setitem__("names", ["a", "a", "b"]), r"input\.names must be 3 distinct"),
    "no-task": (lambda m: m.pop("task"), r"model\.json: lacks task"),
    "lm-task": (lambda m: m.__setitem__("task", {"kind": "lm"}), r"task\.kind 'lm' does not fit input\.kind 'vector'"),
    "one-class": (lambda m: m["task"].__setitem__("classes", ["w"]), r"task\.classes must be 2 or more"),
    "labels": (lambda m: m["task"].__setitem__("labels", "frame"), r"task\.labels must be one of sequence, step"),
    "vocab": (lambda m: m.__setitem__("vocab", ["a", "b"]), r"vocab is for token models, and input\.kind is vector"),
    "generate": (lambda m: m["files"].__setitem__("generate.onnx", "0" * 64), r"files lists generate\.onnx"),
    "wrong-width": (lambda m: m["input"].update(features=4, mean=[0.0] * 4, std=[1.0] * 4, names=list("abcd")),
                    r"model\.onnx: input inputs has last axis 3, model\.json implies 4"),
    "class-count": (lambda m: m["task"]["classes"].append("v"), r"output outputs has last axis 4, model\.json implies 5"),
    "renamed-class": (lambda m: m["task"]["classes"].__setitem__(0, "q"), r"metadata_props task does not match"),
    "other-mean": (lambda m: m["input"]["mean"].__setitem__(0, 11.0), r"metadata_props input does not match"),
}
BAD_FORECAST_JSON = {
    "output-size": (lambda m: m["task"].__setitem__("output_size", 5), r"task\.output_size must be 6"),
    "outputs": (lambda m: m["task"].__setitem__("outputs", ["log_var", "mean"]), r"task\.outputs must be one of"),
    "mean-only": (lambda m: m["task"].update(outputs=["mean"], output_size=3),
                  r"output outputs has last axis 6, model\.json implies 3"),
    "horizon": (lambda m: m["task"].__setitem__("horizon", 0), r"task\.horizon must be a positive integer"),
}


@pytest.mark.parametrize("case", list(BAD_VECTOR_JSON) + list(BAD_FORECAST_JSON))
def test_contract_rejects_bad_vector_model_json(vector_repo: Path, tmp_path: Path, case: str) -> None:
    name = "cls" if case in BAD_VECTOR_JSON else "fc"
    change, problem = {**BAD_VECTOR_JSON, **BAD_FORECAST_JSON}[case]
    d = tmp_path / name / "1"
    shutil.copytree(vector_repo / name / "1", d)
    verify_version_dir(d)
    _edit(d, change)
    with pytest.raises(ModelFormatError, match=problem):
        verify_version_dir(d)


def test_contract_rejects_a_token_graph_under_a_vector_model_json(vector_repo: Path, tiny_repo: Path,
                                                                   tmp_path: Path) -> None:
    d = tmp_path / "cls" / "1"
    shutil.copytree(vector_repo / "cls" / "1", d)
    for f in ("model.onnx", "sequence.onnx"):
        shutil.copy(tiny_repo / "tiny" / "1" / f, d / f)
    _edit(d, lambda m: m["files"].update({f: json.loads((tiny_repo / "tiny" / "1" / "model.json").read_text())
                                          ["files"][f] for f in ("model.onnx", "sequence.onnx")}))
    with pytest.raises(ModelFormatError, match=r"inputs \[\('tokens', 'tensor\(int64\)', 1\).* break the contract"):
        verify_version_dir(d)


def test_export_refuses_bad_models_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = vector_model("lstm", "forecast")
    real = sg._initializers
    monkeypatch.setattr(sg, "_initializers", lambda m: [
        t if t.name != "in.mean" else onnx.numpy_helper.from_array(MEAN + np.float32(0.01), "in.mean") for t in real(m)])
    with pytest.raises(ExportError, match="parity check failed: step max abs diff"):
        export_series_model(model, INFO, tmp_path, "bad")
    monkeypatch.undo()
    with pytest.raises(ExportError, match="5 class names for a head of 4 classes"):
        export_series_model(vector_model("gru", "classify"), {**INFO, "classes": list("vwxyz")}, tmp_path, "bad")
    with torch.no_grad():
        model.head.bias[0] = float("inf")
    with pytest.raises(ExportError, match="head.bias holds NaN or infinite"):
        export_series_model(model, INFO, tmp_path, "bad")
    assert not any((tmp_path / "bad").glob("*"))  # no version, no temporary folder


def test_export_cli_measures_an_eval_set(tmp_path: Path) -> None:
    model = vector_model("gru", "classify", seed=1)
    info = {**INFO, "features": ["a", "b", "c"]}
    ckpt = checkpoint.save(tmp_path / "run" / "ckpt.pt", {
        "kind": "series", "config": model.config.to_dict(), "series": info, "vocab": [], "model": model.state_dict(),
        "metrics": {"val_loss": 1.0, "steps": 3, "wall_time_s": 0.1, "test_accuracy": 0.5}})
    g = np.random.default_rng(0)
    lines = ["id,a,b,c,label"] + [f"s{i},{','.join(f'{v:.3f}' for v in MEAN + STD * g.standard_normal(3))},{'wxyz'[i % 4]}"
                                  for i in range(12) for _ in range(3)]
    (tmp_path / "test.csv").write_text("\n".join(lines) + "\n")
    r = subprocess.run([str(BIN / "rnn-export"), str(ckpt), "--repo", str(tmp_path / "models"),
                        "--eval-series", str(tmp_path / "test.csv")], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    meta = verify_version_dir(out["path"])
    assert meta.metrics["test_accuracy_torch"] == 0.5 and meta.metrics["test_sequences"] == 12
    assert 0.0 <= out["test_accuracy"] <= 1.0 and meta.source["eval_series_sha256"]
    r = subprocess.run([str(BIN / "rnn-export"), str(ckpt), "--repo", str(tmp_path / "models"),
                        "--eval-corpus", str(tmp_path / "test.csv")], check=False, capture_output=True, text=True,
                       timeout=120)
    # an eval flag of the other kind is a usage error (exit 2), as a missing or unusable one is
    assert r.returncode == 2 and "is a sequence model: evaluate it with --eval-series, not --eval-corpus" in r.stderr


def test_shipped_vector_model_meets_its_stated_accuracy() -> None:
    """models/japanese-vowels/1 verifies as a server checks it; onnxruntime re-measures, from data/, the
    held-out accuracy its model.json states, and one frame at a time through model.onnx (streaming)
    gives the same answer as the whole utterance through sequence.onnx."""
    name, cell, classes, goal = SHIPPED
    folder = ROOT / "models" / name / "1"
    meta = verify_version_dir(folder)
    assert (meta.cell, meta.input_kind, meta.task, list(meta.classes), meta.features) == (cell, "vector", "classify",
                                                                                       classes, 12)
    test = load_csv(ROOT / "data" / "japanese_vowels" / "test.csv", classes=meta.classes)
    assert len(test) == 370 and test.features == tuple(meta.input_spec["names"])
    step, seq = open_session(folder / "model.onnx"), open_session(folder / "sequence.onnx")
    s0 = meta.initial_state_array()[None]
    correct = 0
    for i, (x, y) in enumerate(zip(test.seqs, test.labels)):
        logits, _ = seq.run(None, {"inputs": x[None], "state": s0})  # raw frames in: the graph normalises
        correct += int(logits[0, -1].argmax() == y[0])
        if i % 37 == 0:
            state = s0
            for frame in x:
                out, state = step.run(None, {"inputs": frame[None], "state": state})
            assert np.abs(out[0] - logits[0, -1]).max() <= 1e-4
    accuracy = correct / len(test)
    assert accuracy == pytest.approx(meta.metrics["test_accuracy"], abs=1e-9) and accuracy >= goal

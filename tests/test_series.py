"""rnn-train --series: the CSV/NPZ layouts and their errors, normalisation, the losses, TBPTT, learning, the CLI."""
from __future__ import annotations

import csv
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rnnserve.trainer import checkpoint
from rnnserve.trainer.args import TrainArgs
from rnnserve.trainer.model import SeriesConfig, SeriesModel
from rnnserve.trainer.series import PAD_LABEL, SeriesError, fit_normalization, load_series, pad
from rnnserve.trainer.series_train import SeriesRun, evaluate, rollout, task_loss
from rnnserve.trainer.train import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BIN = Path(sys.executable).parent
HEADER = "id,t,a,b,label\n"
GOOD = HEADER + "s1,0,1.0,2.0,x\ns1,1,1.5,2.5,x\ns2,0,3.0,4.0,y\ns2,1,3.5,4.5,y\ns2,2,3.0,4.0,y\n"
TINY = ["--hidden", "8", "--batch", "8", "--eval-every", "1000", "--no-progress", "--threads", "1", "--log-every", "0"]


def write_waves(path: Path, n: int, seed: int, step_labels: bool = False) -> Path:
    """n sequences of 2 features, 8-15 steps: a sine whose frequency is the class (3 classes), offset and scaled."""
    g = np.random.default_rng(seed)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "a", "b", "label"])
        for i in range(n):
            c, length, ph = int(g.integers(0, 3)), int(g.integers(8, 16)), g.uniform(0, 6.28)
            t = np.arange(length)
            a = 40.0 + 6.0 * np.sin(0.35 * (c + 1) * t + ph)
            b = 0.5 * np.cos(0.35 * (c + 1) * t + ph)
            for k in range(length):
                lab = ["lo", "mid", "hi"][c] if not step_labels else ("up" if b[k] > 0 else "down")
                w.writerow([f"q{i}", f"{a[k]:.4f}", f"{b[k]:.4f}", lab])
    return path


# -- the layouts ------------------------------------------------------------------------------------------------

def test_csv_layout(tmp_path: Path) -> None:
    p = tmp_path / "d.csv"
    p.write_text(GOOD)
    d = load_series(p)
    assert d.ids == ("s1", "s2") and d.features == ("a", "b") and d.classes == ("x", "y")
    assert [s.shape for s in d.seqs] == [(2, 2), (3, 2)] and d.seqs[1].dtype == np.float32
    assert [int(lab[0]) for lab in d.labels] == [0, 1] and d.label_mode == "sequence" and d.frames == 5
    assert load_series(p, features=["b"]).features == ("b",)
    steps = load_series(p, labels="step")
    assert [list(lab) for lab in steps.labels] == [[0, 0], [1, 1, 1]]
    assert load_series(p, labels=None).labels is None  # forecasting ignores the label column
    p.write_text("id,v,label\n" + "".join(f"s{i},{i},{c}\n" for i, c in enumerate(["10", "2", "1", "2"])))
    assert load_series(p).classes == ("1", "2", "10")  # numeric names in numeric order


def test_npz_layout(tmp_path: Path) -> None:
    x = np.arange(2 * 4 * 3, dtype=np.float64).reshape(2, 4, 3)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, lengths=np.array([2, 4]), y=np.array([1, 0]), classes=np.array(["cat", "dog"]),
             features=np.array(["u", "v", "w"]))
    d = load_series(p)
    assert [s.shape for s in d.seqs] == [(2, 3), (4, 3)] and np.array_equal(d.seqs[1], x[1])
    assert d.classes == ("cat", "dog") and d.features == ("u", "v", "w") and [int(v[0]) for v in d.labels] == [1, 0]
    xb, lengths, yb = pad(d, np.array([0, 1]))
    assert xb.shape == (2, 4, 3) and list(lengths) == [2, 4] and list(yb) == [1, 0] and not xb[0, 2:].any()
    np.savez(p, x=x, y=np.array([[0, 1, 1, 0], [1, 1, 0, 0]]))
    d = load_series(p, labels="step")
    assert d.label_mode == "step" and d.classes == ("0", "1")
    _, _, yb = pad(d, np.array([0]))
    assert list(yb[0]) == [0, 1, 1, 0]


@pytest.mark.parametrize("body,labels,message", [
    (HEADER + "s1,0,1.0,oops,x\n", "sequence", "row 2, column b: 'oops' is not a number"),
    (HEADER + "s1,0,1.0,2.0,x\ns1,1,,2.0,x\n", "sequence", "row 3, column a: missing value"),
    (HEADER + "s1,0,1.0,2.0,x\ns1,1,1.0\n", "sequence", "row 3, column b: has 3 fields, the header has 5"),
    (HEADER + "s1,0,1.0,2.0,x,extra\n", "sequence", "row 2, column 6: has 6 fields, the header has 5"),
    (HEADER + "s1,0,1.0,nan,x\n", "sequence", "row 2, column b: 'nan' is not finite"),
    (HEADER + "s1,0,1.0,2.0,x\ns2,0,1.0,2.0,y\ns1,1,1.0,2.0,x\n", "sequence",
     "row 4, column id: sequence 's1' resumes here after other sequences"),
    (HEADER + "s1,0,1.0,2.0,x\ns1,0,1.0,2.0,x\n", "sequence", "row 3, column t: t 0 does not increase"),
    (HEADER + "s1,0,1.0,2.0,x\ns1,1,1.0,2.0,y\n", "sequence", "row 3, column label: label 'y' differs from 'x'"),
    (HEADER + "s1,0,1.0,2.0,\n", "step", "row 2, column label: missing label"),
    (HEADER + ",0,1.0,2.0,x\n", "sequence", "row 2, column id: missing sequence id"),
    ("t,a,b\n0,1,2\n", "sequence", "row 1: no 'id' column"),
    ("id,a,b\ns1,1,2\n", "sequence", "row 1: no 'label' column to classify by"),
    ("id,a,a\ns1,1,2\n", None, "row 1: duplicate column names ['a']"),
    ("id,label\ns1,x\n", "sequence", "row 1: no feature columns"),
    (HEADER, "sequence", "has a header but no rows"),
])
def test_csv_errors_name_file_row_and_column(tmp_path: Path, body: str, labels: str | None, message: str) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(SeriesError) as e:
        load_series(p, labels)
    assert str(e.value).startswith(f"{p}: ") and message in str(e.value), str(e.value)


def test_npz_errors_and_unknown_test_labels(tmp_path: Path) -> None:
    x = np.zeros((2, 3, 2))
    x[1, 2, 1] = np.nan
    p = tmp_path / "bad.npz"
    np.savez(p, x=x, features=np.array(["a", "b"]))
    with pytest.raises(SeriesError, match=r"bad\.npz: sequence 1, step 2, column b \(x\[1, 2, 1\]\): value nan"):
        load_series(p, labels=None)
    np.savez(p, x=np.zeros((2, 3, 2)), lengths=np.array([3, 0]))
    with pytest.raises(SeriesError, match=r"sequence 1, column lengths\[1\]: length 0 is outside 1\.\.3"):
        load_series(p, labels=None)
    np.savez(p, x=np.zeros((2, 3, 2)), y=np.array([0, 5]), classes=np.array(["a", "b"]))
    with pytest.raises(SeriesError, match=r"sequence 1, column y\[1\]: label 5 is not a class index 0\.\.1"):
        load_series(p)
    np.savez(p, x=np.zeros((2, 3)))
    with pytest.raises(SeriesError, match=r"x must be a non-empty numeric \(N, T, F\) array"):
        load_series(p)
    test = tmp_path / "test.csv"
    test.write_text(HEADER + "s9,0,1.0,2.0,x\ns9,1,1.0,2.0,x\ns8,0,1.0,2.0,zebra\n")
    with pytest.raises(SeriesError, match=r"row 4, column label: label 'zebra' is not one of the training classes"):
        load_series(test, classes=("x", "y"))
    for name, problem in (("nope.csv", "does not exist"), ("d.txt", "neither a .csv nor a .npz")):
        (tmp_path / "d.txt").write_text("x")
        with pytest.raises(SeriesError, match=problem):
            load_series(tmp_path / name)


def test_cli_turns_loader_errors_into_one_line_and_exit_2(tmp_path: Path) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(HEADER + "s1,0,1.0,2.0,x\ns1,1,1.0,abc,x\n")
    r = subprocess.run([str(BIN / "rnn-train"), "--series", str(p), "--out", str(tmp_path / "r")],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"rnn-train: error: {p}: row 3, column b: 'abc' is not a number"


def test_cli_flag_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    p = tmp_path / "d.csv"
    p.write_text(GOOD)
    for argv, message in ((["--series", str(p), "--data", str(p)], "--data (a UTF-8 text file) or --series"),
                          (["--series", str(p), "--calibrate", "0.1"], "--calibrate is for text runs"),
                          (["--data", str(p), "--task", "forecast"], "--task is for numeric sequence runs"),
                          (["--series", str(p), "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
                          (["--series", str(p), "--val-fraction", "0.9"], "too few to hold 90% out")):
        assert main([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


# -- normalisation, losses, TBPTT ------------------------------------------------------------------------------

def test_normalisation_is_fitted_on_the_training_split_only(tmp_path: Path) -> None:
    data = write_waves(tmp_path / "w.csv", 30, 0)
    args = TrainArgs(series=str(data), out=str(tmp_path / "r"), hidden=8, batch=4, val_fraction=0.3, seed=3,
                     progress=False)
    run = SeriesRun(args)
    mean, std = fit_normalization(run.train_set)
    whole = np.concatenate(load_series(data).seqs)
    assert np.allclose(run.model.in_mean.numpy(), mean) and np.allclose(run.model.in_std.numpy(), std)
    assert not np.allclose(mean, whole.mean(0), atol=1e-4)  # the held-out sequences were left out
    assert run.info()["mean"] == [float(v) for v in mean] and len(run.val_set) == 9


def test_classification_losses_sum_over_the_steps_they_apply_to() -> None:
    torch.manual_seed(0)
    cfg = SeriesConfig(features=2, task="classify", classes=3)
    scores = torch.randn(2, 5, 3)  # (B, T, C)
    lengths = torch.tensor([3, 5])
    y = torch.tensor([2, 0])
    loss, n = task_loss(cfg, scores, torch.zeros(2, 5, 2), lengths, y, 0)
    want = F.cross_entropy(scores[0, 2], y[0], reduction="sum") + F.cross_entropy(scores[1, 4], y[1], reduction="sum")
    assert n == 2 and torch.allclose(loss, want)  # each sequence at its own last step
    loss, n = task_loss(cfg, scores[:, 3:], torch.zeros(2, 5, 2), lengths, y, 3)  # a later chunk: only row 1 ends
    assert n == 1 and torch.allclose(loss, F.cross_entropy(scores[1, 4], y[1], reduction="sum"))
    ys = torch.tensor([[0, 1, 2, PAD_LABEL, PAD_LABEL], [2, 2, 1, 0, 1]])
    loss, n = task_loss(cfg, scores, torch.zeros(2, 5, 2), lengths, ys, 0)
    by_hand = sum(F.cross_entropy(scores[b, t], ys[b, t], reduction="sum") for b in range(2) for t in range(5)
                  if ys[b, t] != PAD_LABEL)
    assert n == 8 and torch.allclose(loss, by_hand)


def test_forecast_nll_and_chunks_carry_state() -> None:
    """The Gaussian NLL by hand; TBPTT chunks with the carried state sum to the whole sequence's loss."""
    torch.manual_seed(1)
    for loss_kind in ("nll", "mse"):
        cfg = SeriesConfig(features=2, task="forecast", loss=loss_kind, cell="lstm", hidden_size=6)
        model = SeriesModel(cfg).eval()
        model.set_normalization(torch.tensor([5.0, -1.0]), torch.tensor([2.0, 0.5]))
        x = 5.0 + torch.randn(3, 9, 2)
        lengths = torch.tensor([9, 4, 7])
        xn = model.normalize(x)
        with torch.no_grad():
            scores, _ = model.scores(x)
            whole, n = task_loss(cfg, scores, xn, lengths, None, 0)
            assert n == 8 + 3 + 6
            mu = scores[..., :2]
            by_hand = 0.0
            for b in range(3):
                for t in range(int(lengths[b]) - 1):
                    err = xn[b, t + 1] - mu[b, t]
                    if loss_kind == "mse":
                        by_hand += float((err ** 2).sum())
                    else:
                        lv = scores[b, t, 2:]
                        by_hand += float(0.5 * (lv + err ** 2 / lv.exp() + np.log(2 * np.pi)).sum())
            assert float(whole) == pytest.approx(by_hand, rel=1e-5)
            state, total, count = None, 0.0, 0
            for s in range(0, 9, 4):
                sc, state = model.scores(x[:, s : s + 4], state)
                part, k = task_loss(cfg, sc, xn, lengths, None, s)
                total, count = total + float(part), count + k
        assert count == n and total == pytest.approx(float(whole), rel=1e-5)


def _loss_of(model: SeriesModel, lengths: torch.Tensor, y: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    scores, _ = model.scores(frames)
    target = model.normalize(frames) if model.config.task == "forecast" else frames
    return task_loss(model.config, scores, target, lengths, y, 0)[0]


@pytest.mark.parametrize("cell", ["elman", "gru", "lstm"])
def test_the_gradient_reaches_the_input_layer(cell: str) -> None:
    """d loss / d frames by autograd (through the cells' hand-written backward and the input projection)
    matches finite differences, and the first layer's W_x gets a gradient."""
    torch.manual_seed(2)
    for task in ("classify", "forecast"):
        model = SeriesModel(SeriesConfig(features=3, task=task, classes=3, cell=cell, hidden_size=5, layers=2)).double()
        model.set_normalization(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.0, 2.0]))
        model.double()
        x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
        lengths, y = torch.tensor([6, 4]), torch.tensor([1, 2])
        loss_of = functools.partial(_loss_of, model, lengths, y)
        assert torch.autograd.gradcheck(loss_of, (x,), eps=1e-6, atol=1e-6)
        model.zero_grad()
        loss_of(x).backward()
        g = model.cells[0].w_x.grad
        assert g is not None and bool(g.isfinite().all()) and float(g.abs().sum()) > 0
        assert float(x.grad[1, :4].abs().sum()) > 0 and float(x.grad[1, 4:].abs().sum()) == 0  # padding: none


# -- training ---------------------------------------------------------------------------------------------------

def test_a_classifier_learns_and_its_checkpoint_exports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train, test = write_waves(tmp_path / "train.csv", 90, 0), write_waves(tmp_path / "test.csv", 45, 1)
    out = tmp_path / "run"
    assert main(["--series", str(train), "--test", str(test), "--out", str(out), "--cell", "gru", "--steps", "200",
                 "--lr", "1e-2", "--val-fraction", "0.2", *TINY, "--hidden", "16"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_accuracy"] >= 0.9 and result["test_targets"] == 45  # chance is 1/3
    raw = checkpoint.read(out / "ckpt.pt")
    assert raw["kind"] == "series" and raw["series"]["classes"] == ["hi", "lo", "mid"]
    loaded = checkpoint.load(out / "ckpt.pt")
    assert loaded.is_series and isinstance(loaded.model, SeriesModel)
    m = evaluate(loaded.model, load_series(test, classes=tuple(raw["series"]["classes"])))
    assert m["accuracy"] == pytest.approx(result["test_accuracy"])


def test_per_step_labels_learn(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = write_waves(tmp_path / "train.csv", 60, 2, step_labels=True)
    assert main(["--series", str(train), "--labels", "step", "--out", str(tmp_path / "r"), "--cell", "elman",
                 "--steps", "80", "--lr", "1e-2", "--val-fraction", "0.25", *TINY]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_accuracy"] >= 0.9 and result["val_targets"] > 15 * 8  # every step of 15 sequences


def test_a_forecaster_beats_the_last_value_over_its_horizon(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = write_waves(tmp_path / "train.csv", 80, 3)
    assert main(["--series", str(train), "--task", "forecast", "--horizon", "4", "--seq-len", "5",
                 "--out", str(tmp_path / "r"), "--cell", "lstm", "--steps", "300", "--lr", "1e-2",
                 "--val-fraction", "0.2", *TINY, "--hidden", "16"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["val_rollout4_rmse"] < 0.5 * r["val_last_value4_rmse"], r
    loaded = checkpoint.load(tmp_path / "r" / "ckpt.pt")
    seq = torch.from_numpy(load_series(train, labels=None).seqs[0][None])
    pred = rollout(loaded.model, seq[:, :-4], 4)  # (1, 4, F): raw units, each mean fed back
    assert pred.shape == (1, 4, 2) and float((pred - seq[:, -4:]).abs().max()) < 3.0


def test_resume_continues_bit_identically(tmp_path: Path) -> None:
    train = write_waves(tmp_path / "train.csv", 20, 4)
    common = ["--series", str(train), "--task", "forecast", "--seq-len", "4", "--cell", "gru", "--steps", "12", *TINY]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--stop-at", "5"]) == 0
    assert checkpoint.read(tmp_path / "b" / "ckpt.pt")["train"]["offset"] > 0  # stopped inside a batch
    assert main(["--resume", str(tmp_path / "b" / "ckpt.pt"), "--no-progress"]) == 0
    a, b = checkpoint.read(tmp_path / "a" / "ckpt.pt")["model"], checkpoint.read(tmp_path / "b" / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)

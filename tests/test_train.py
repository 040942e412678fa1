"""rnn-train: the loss, clipping, reproducibility, exact resume, outputs, CLI errors, the bounded validation
sample and tokens/s without it (tiny models)."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from rnnserve.trainer import checkpoint
from rnnserve.trainer.data import StreamBatches, split
from rnnserve.trainer.train import Run, TrainArgs, clip_gradients, evaluate, main, sequence_loss

TEXT = "".join(f"{w} the quick brown fox {i % 7} jumps over the lazy dog.\n"
               for i, w in enumerate(["To be", "or not", "to be:", "that is", "the question"] * 12))
TINY = ["--hidden", "8", "--embed", "4", "--batch", "2", "--seq-len", "8", "--eval-every", "4",
        "--no-progress", "--threads", "1", "--warmup", "2"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def train(corpus: Path, out: Path, *extra: str) -> int:
    return main(["--data", str(corpus), "--out", str(out), *TINY, *extra])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read(path)["model"]


def test_loss_is_the_sum_of_per_step_cross_entropies() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    targets = torch.randint(0, 7, (3, 5))
    by_hand = sum(-torch.log_softmax(logits[b, t], -1)[targets[b, t]] for b in range(3) for t in range(5))
    torch.testing.assert_close(sequence_loss(logits, targets), by_hand)
    per_step = [F.cross_entropy(logits[:, t], targets[:, t], reduction="sum") for t in range(5)]
    torch.testing.assert_close(sequence_loss(logits, targets), torch.stack(per_step).sum())


def test_clipping_caps_the_norm_and_returns_the_norm_before() -> None:
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])
    assert clip_gradients([a, b], 1.0) == pytest.approx(5.0)
    assert torch.cat([a.grad, b.grad]).norm() == pytest.approx(1.0)
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0, 0.0]))
    assert clip_gradients([a, b], 10.0) == pytest.approx(1.0)  # under the cap: untouched
    assert torch.allclose(b.grad, torch.tensor([0.0, 0.8]))
    assert clip_gradients([a, b], 0.0) == pytest.approx(1.0)  # <= 0: off, norm still reported


def test_train_step_logs_the_pre_clip_norm_of_the_mean_loss(corpus: Path, tmp_path: Path) -> None:
    args = TrainArgs(data=str(corpus), out=str(tmp_path / "r"), hidden=8, embed=4, batch=2, seq_len=8,
                     steps=3, clip=1e-3, progress=False)
    run = Run(args)
    x, y, _ = run.batches.chunk(0)
    logits, _ = run.model(x, run.model.initial_state(2))
    (sequence_loss(logits, y) / y.numel()).backward()
    expected = torch.cat([p.grad.flatten() for p in run.params]).norm().item()
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    loss, norm = run.train_step()
    assert norm == pytest.approx(expected, rel=1e-5) and norm > 1e-3  # so the clip was active
    assert loss == pytest.approx(float(sequence_loss(logits, y).detach()) / y.numel(), rel=1e-6)
    assert any(not torch.equal(before[k], v) for k, v in run.model.state_dict().items())


def test_seed_reproducible_and_outputs_written(corpus: Path, tmp_path: Path) -> None:
    assert train(corpus, tmp_path / "a", "--steps", "5", "--seed", "7") == 0
    assert train(corpus, tmp_path / "b", "--steps", "5", "--seed", "7") == 0
    assert train(corpus, tmp_path / "c", "--steps", "5", "--seed", "8") == 0
    wa, wb, wc = (weights(tmp_path / d / "ckpt.pt") for d in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    assert all(r["grad_norm"] > 0 and r["tokens"] == r["step"] * 16 for r in steps)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 5]
    assert (tmp_path / "a" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    raw = checkpoint.read(tmp_path / "a" / "ckpt.pt")
    assert raw["metrics"]["steps"] == 5 and raw["metrics"]["tokens"] == 80
    assert raw["metrics"]["val_loss"] == rows[-1]["val_loss"]
    assert raw["vocab"] == sorted(set(TEXT)) and raw["config"]["vocab_size"] == len(set(TEXT))
    assert {"optimizer", "scheduler", "rng", "position", "args"} <= set(raw["train"])
    loaded = checkpoint.load(tmp_path / "a" / "ckpt.pt")
    assert loaded.config.hidden_size == 8 and loaded.metrics["steps"] == 5


def test_resume_continues_bit_identically(corpus: Path, tmp_path: Path) -> None:
    # Two layers with all three dropouts (RNG), a learned initial state, shifted epochs, and a corpus short enough
    # that the 14 steps cross an epoch (11 chunks per epoch), so the state reset is resumed too.
    corpus.write_text(TEXT[:200], encoding="utf-8")
    extra = ["--layers", "2", "--dropout", "0.3", "--out-dropout", "0.2", "--weight-drop", "0.2", "--shift-epochs",
             "--init-state", "learned", "--steps", "14", "--seed", "3"]
    assert train(corpus, tmp_path / "straight", *extra) == 0
    assert train(corpus, tmp_path / "split", *extra, "--stop-at", "6") == 0
    assert checkpoint.read(tmp_path / "split" / "ckpt.pt")["metrics"]["steps"] == 6
    assert main(["--resume", str(tmp_path / "split" / "ckpt.pt"), "--no-progress"]) == 0
    straight, resumed = (checkpoint.read(tmp_path / d / "ckpt.pt") for d in ("straight", "split"))
    assert resumed["metrics"]["steps"] == 14
    per_epoch = StreamBatches(split(np.arange(200))[0], 2, 8).chunks_per_epoch
    assert straight["train"]["position"] == 14 > per_epoch
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert straight["metrics"]["val_loss"] == resumed["metrics"]["val_loss"]
    losses = [[json.loads(x).get("loss") for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "split")]
    assert losses[0] == losses[1]  # the history is continued, not duplicated


def test_cli_errors_are_clear(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def err(*argv: str) -> str:  # a usage error: exit 2 before any training, one line on stderr
        assert main([*argv, "--no-progress"]) == 2
        e = capsys.readouterr().err
        assert "Traceback" not in e and e.count("\n") == 1 and e.startswith("rnn-train: error: "), e
        return e

    assert "does not exist" in err("--data", str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    assert "not valid UTF-8" in err("--data", str(tmp_path / "latin1.txt"))
    (tmp_path / "short.txt").write_text("abcdefghij")
    assert "cannot fill" in err("--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "s"))
    assert "--data is required" in err("--steps", "3")
    assert f"corpus {tmp_path} is a directory, not a text file" in err("--data", str(tmp_path))
    for flag, value, message in (("--dropout", "1.5", "--dropout must be in [0, 1), got 1.5"),
                                 ("--weight-drop", "-0.1", "--weight-drop must be in [0, 1), got -0.1"),
                                 ("--threads", "-1", "--threads must be >= 0, got -1"),
                                 ("--log-every", "-5", "--log-every must be >= 0, got -5"),
                                 ("--lr", "nan", "--lr a number > 0, got 0, nan"),
                                 ("--stop-at", "0", "--stop-at must be a step >= 1, got 0"),
                                 ("--val-streams", "0", "--val-streams must be >= 1"),
                                 ("--device", "cuda:x", "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
                                 ("--eval-chars", "3", "--eval-chars 3 is fewer than --val-streams 4")):
        extra = ("--val-streams", "4") if flag == "--eval-chars" else ()
        assert message in err("--data", str(corpus), "--out", str(tmp_path / "u"), flag, value, *extra), flag
    for value in ("-1", "lots"):
        with pytest.raises(SystemExit) as e:
            main(["--data", str(corpus), "--eval-chars", value])
        assert e.value.code == 2
        assert "argument --eval-chars: must be a number of characters >= 0 or 'all'" in capsys.readouterr().err
    assert "--hidden must be >= 1" in err("--data", str(corpus), "--hidden", "0")
    if not torch.cuda.is_available():
        assert "CUDA is not available" in err("--data", str(corpus), "--device", "cuda")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read: truncated or not a checkpoint" in err("--resume", str(tmp_path / "junk.pt"))
    assert train(corpus, tmp_path / "r", "--steps", "2") == 0
    capsys.readouterr()
    assert "--hidden cannot change on --resume" in err("--resume", str(tmp_path / "r" / "ckpt.pt"),
                                                       "--hidden", "16", "--steps", "4")
    assert "already at step 2" in err("--resume", str(tmp_path / "r" / "ckpt.pt"))
    assert "--calibrate must be a fraction in [0, 0.5], got 0.7" in err("--data", str(corpus), "--calibrate", "0.7")
    assert "holds out 0 chars" in err("--data", str(corpus), "--calibrate", "0.0001")


def test_calibrate_holds_out_the_corpus_head_and_folds_a_fitted_temperature(corpus: Path, tmp_path: Path) -> None:
    args = ["--steps", "12", "--lr", "0.03", "--calibrate", "0.25"]
    assert train(corpus, tmp_path / "c", *args) == 0
    raw = checkpoint.read(tmp_path / "c" / "ckpt.pt")
    t = raw["metrics"]["temperature"]
    rows = [json.loads(x) for x in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    assert [r["temperature"] for r in rows if "temperature" in r] == [t] and t != 1.0  # fitted once, at the end
    run = Run(TrainArgs(data=str(corpus), out=str(tmp_path / "probe"), batch=2, seq_len=8, calibrate=0.25))
    full = split(run.vocab.encode(TEXT))[0]
    held = round(len(full) * 0.25)
    assert np.array_equal(run.calib_ids, full[:held]) and np.array_equal(run.train_ids, full[held:])
    assert run.batches.data.numel() <= len(full) - held  # the streams are cut from the rest only
    # the saved head already has 1/T folded in: no other scale of its logits fits the held-out text better
    model = checkpoint.load(tmp_path / "c" / "ckpt.pt").model.eval()
    ids = torch.from_numpy(np.asarray(run.calib_ids, dtype=np.int64))
    with torch.no_grad():
        logits = model(ids[:-1].unsqueeze(0))[0][0]
    nll = {s: F.cross_entropy(logits * s, ids[1:]).item() for s in (0.9, 0.97, 1.0, 1.03, 1.1)}
    assert min(nll, key=nll.get) == 1.0, nll
    assert raw["metrics"]["val_loss"] == rows[-1]["val_loss"]  # validated after the fold


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rnnserve.trainer.train", "--data", str(tmp_path / "none.txt")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "rnn-train: error: corpus" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_saves_a_resumable_checkpoint(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "rnnserve.trainer.train", "--data", str(corpus), "--out", str(out),
                             *TINY, "--steps", "100000", "--eval-every", "100000", "--log-every", "1"],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until it is training
        if "step 3 loss" in line:
            break
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "resumable" in err and "Traceback" not in err
    raw = checkpoint.read(out / "ckpt.pt")
    assert raw["metrics"]["steps"] >= 3 and raw["train"]["position"] == raw["metrics"]["steps"]


def test_validation_scores_a_fixed_sample_and_the_last_pass_all_of_it(corpus: Path, tmp_path: Path) -> None:
    """--eval-chars N: every pass scores the first N held-out chars (val_loss_sample: the same ones, so the
    passes compare); val_loss, the whole split's (the export's measure), only where a pass scored all of it: at
    --steps, or every pass with 0. A checkpoint between holds val_loss None, never the sample's number."""
    assert train(corpus, tmp_path / "s", "--steps", "8", "--eval-chars", "50", "--stop-at", "4") == 0
    assert checkpoint.read(tmp_path / "s" / "ckpt.pt")["metrics"]["val_loss"] is None
    assert main(["--resume", str(tmp_path / "s" / "ckpt.pt"), "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss_sample" in r]
    run = Run(TrainArgs(data=str(corpus), out=str(tmp_path / "probe"), hidden=8, embed=4, batch=2, seq_len=8))
    n_val = len(run.val_ids) - 1
    assert [(r["step"], r["val_sample_chars"], "val_loss" in r) for r in val] == [(4, 50, False), (8, 50, True)]
    raw = checkpoint.read(tmp_path / "s" / "ckpt.pt")["metrics"]
    assert (raw["val_loss"], raw["val_loss_sample"], raw["val_sample_chars"]) == (val[1]["val_loss"],
                                                                           val[1]["val_loss_sample"], 50)
    model = checkpoint.load(tmp_path / "s" / "ckpt.pt").model
    assert evaluate(model, run.val_ids[:51]) == pytest.approx(val[1]["val_loss_sample"], abs=1e-6)  # first 50
    assert evaluate(model, run.val_ids) == pytest.approx(val[1]["val_loss"], abs=1e-6)  # all n_val
    run = Run(TrainArgs(data=str(corpus), out=str(tmp_path / "again"), hidden=8, embed=4, batch=2, seq_len=8,
                        eval_chars=50))
    first = run.validate()
    run.model.load_state_dict(model.state_dict())  # other weights, then the trained ones: the same loss again
    assert run.validate() == pytest.approx(val[1]["val_loss_sample"], abs=1e-6) != first
    assert run.val_loss is None and run.validate(whole=True) == run.val_loss_sample and run.val_loss is not None
    assert train(corpus, tmp_path / "all", "--steps", "4", "--eval-every", "2", "--eval-chars", "all") == 0
    rows = [json.loads(x) for x in (tmp_path / "all" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["val_sample_chars"], r["val_loss"] == r["val_loss_sample"]) for r in rows if "val_loss" in r] == \
        [(n_val, True), (n_val, True)]


def test_tokens_per_second_leave_validation_out(corpus: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """A slow validation pass (0.5 s here) between two log lines does not lower the tokens/s they report."""
    class SlowValidation(Run):
        def validate(self, whole: bool = False) -> float:
            time.sleep(0.5)
            return super().validate(whole)

    args = TrainArgs(data=str(corpus), out=str(tmp_path / "r"), hidden=8, embed=4, batch=2, seq_len=8, steps=8,
                     eval_every=2, log_every=4, progress=False, threads=1)
    with caplog.at_level(logging.INFO, logger="rnnserve.trainer.train"):
        SlowValidation(args).run()
    rates = [float(m.group(1)) for m in (re.search(r"(\d+) tok/s", r.getMessage()) for r in caplog.records) if m]
    assert len(rates) == 2
    tokens = 4 * 2 * 8  # per log interval, which holds two 0.5 s validations
    assert min(rates) > 3 * tokens / 0.5, rates  # with them counted it would be under tokens / 1.0 s


def test_series_validation_scores_a_fixed_spread_sample(tmp_path: Path) -> None:
    """--eval-sequences N: N validation sequences spread evenly over them, every pass; all of them at --steps."""
    from rnnserve.trainer.series_train import eval_subset

    rng = np.random.default_rng(0)
    lines = ["id,a,b,label"] + [f"s{i},{rng.normal():.4f},{rng.normal():.4f},{'xy'[i % 2]}"
                                for i in range(40) for _ in range(5)]
    data = tmp_path / "d.csv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    assert main(["--series", str(data), "--val-fraction", "0.5", "--eval-sequences", "5", "--out", str(out),
                 "--hidden", "8", "--batch", "4", "--steps", "6", "--eval-every", "3", "--no-progress",
                 "--threads", "1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [(r["step"], r["val_sequences"], "val_loss_full" in r) for r in val] == [(3, 5, False), (6, 5, True)]
    assert val[1]["val_sequences_full"] == 20
    raw = checkpoint.read(out / "ckpt.pt")
    assert raw["metrics"]["val_loss"] == val[1]["val_loss_full"] and raw["metrics"]["val_sequences"] == 20
    from rnnserve.trainer.series import load_series

    full = load_series(data)
    picked = eval_subset(full, 5)
    assert picked.ids == tuple(full.ids[i] for i in (0, 10, 20, 29, 39)) == eval_subset(full, 5).ids
    assert eval_subset(full, 0) is full and eval_subset(full, 40) is full and eval_subset(None, 3) is None

"""rnn-train and rnn-export as console scripts on real files: clear checkpoint errors, the exit-code convention
(2 before any training, 1 when a started run fails, 130 interrupted with the resume hint on its own line),
log lines routed around the progress bar on a terminal, --device, and help that shows the defaults."""
from __future__ import annotations

import fcntl
import os
import pickle
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from rnnserve.trainer import checkpoint

BIN = Path(sys.executable).parent
TEXT = "".join(f"{w} the quick brown fox {i % 7} jumps over the lazy dog.\n"
               for i, w in enumerate(["To be", "or not", "to be:", "that is", "the question"] * 12))
TINY = ["--hidden", "8", "--embed", "4", "--batch", "2", "--seq-len", "8", "--threads", "1", "--warmup", "2"]
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) ")


def cli(*argv: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a console script (rnn-train, rnn-export) from the venv's bin folder."""
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=timeout,
                          check=False, cwd=cwd)


def in_parallel(*calls: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """cli() for each argv, two at a time (each pays torch's import)."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda argv: cli(*argv), calls))


def one_error_line(r: subprocess.CompletedProcess, prog: str) -> str:
    """The run's stderr is exactly one `PROG: error: ...` line (after any log lines); return its message."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip() and not LOG_LINE.match(x)]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), r.stderr
    return lines[0][len(prog) + 9:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run: corpus.txt and run/ckpt.pt (4 steps, resumable), written by the rnn-train console script."""
    work = tmp_path_factory.mktemp("trainer-cli")
    (work / "corpus.txt").write_text(TEXT, encoding="utf-8")
    r = cli("rnn-train", "--data", str(work / "corpus.txt"), "--out", str(work / "run"), *TINY, "--steps", "4",
            "--eval-every", "4", "--no-progress")
    assert r.returncode == 0, r.stderr
    return work


# -- checkpoint errors ------------------------------------------------------------------------------------------

CUT = r"truncated or not a checkpoint \("
EXPECTED = {  # what each broken file's error says after `checkpoint PATH `
    "truncated": CUT + r"a torch archive cut short at [\d,]+ bytes: its directory is missing\)",
    "random": CUT + r"not a torch archive: it starts with b'\\x07\\x08\\t\\n'\)",
    "empty": CUT + r"an empty file, 0 bytes\)",
    "pickle": CUT + r"not a torch archive: a Python pickle\)",
    "flipped": r"cannot be read: damaged \(Bad CRC-32 for file '.+'\); it was modified or copied incompletely",
    "directory": r"is a directory, not a checkpoint file",
    "state_dict": (r"is not an rnnserve checkpoint: a bare state_dict of 1 tensor without format "
                   r"'rnnserve-checkpoint/1', written by another tool"),
    "newer": r"was written by a newer rnnserve \(format 'rnnserve-checkpoint/9'; this one reads 'rnnserve-checkpoint/1'\)",
}


def _bad_checkpoints(run_dir: Path, where: Path) -> dict[str, Path]:
    """Broken checkpoint files, one per EXPECTED entry, made from the real one where they can be."""
    good = (run_dir / "run" / "ckpt.pt").read_bytes()
    # one flipped bit inside a tensor's bytes: torch.load reads it without complaint; the CRC-32 catches it
    with zipfile.ZipFile(run_dir / "run" / "ckpt.pt") as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", good[member.header_offset + 26 : member.header_offset + 30])
    flipped = bytearray(good)
    flipped[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01
    data = {"truncated": good[: len(good) // 2], "random": bytes(range(7, 256)) * 40, "empty": b"",
            "pickle": pickle.dumps({"weights": [1.0, 2.0]}), "flipped": bytes(flipped)}
    out = {name: where / f"{name}.pt" for name in EXPECTED}
    for name, blob in data.items():
        out[name].write_bytes(blob)
    out["directory"].mkdir()
    torch.save({"layer.weight": torch.zeros(2, 2)}, out["state_dict"])
    torch.save({**checkpoint.read(run_dir / "run" / "ckpt.pt"), "format": "rnnserve-checkpoint/9"}, out["newer"])
    return out


def test_broken_checkpoints_name_the_file_and_the_damage(run_dir: Path, tmp_path: Path) -> None:
    """rnn-train --resume (exit 2: an input named by a flag that cannot be used) on a truncated real checkpoint,
    random bytes, an empty file, a pickle of something else, a flipped bit and a directory, and rnn-export (one
    error line, no traceback, nothing published) on the first three; another tool's torch file and a newer
    format say so (checkpoint.read, which both commands call)."""
    bad = _bad_checkpoints(run_dir, tmp_path)
    # through the console scripts: a few (each starts torch); the rest through checkpoint.read, which both call
    resumed = ("truncated", "flipped", "directory")
    exported = ("empty", "random")
    results = in_parallel(*[("rnn-train", "--resume", str(bad[name]), "--no-progress") for name in resumed],
                          *[("rnn-export", str(bad[name]), "--repo", str(tmp_path / "repo")) for name in exported])
    for name, r in zip(resumed, results[: len(resumed)]):
        msg = one_error_line(r, "rnn-train")
        assert r.returncode == 2, (name, r.stderr)
        assert msg.startswith(f"checkpoint {bad[name]} ") and re.search(EXPECTED[name], msg), (name, msg)
    for name, r in zip(exported, results[len(resumed):]):
        msg = one_error_line(r, "rnn-export")
        assert r.returncode == 2, (name, r.stderr)  # a checkpoint that cannot be used: usage error
        assert msg.startswith(f"checkpoint {bad[name]} ") and re.search(EXPECTED[name], msg), (name, msg)
    assert not any(tmp_path.rglob("model.json"))
    for name in ("random", "empty", "pickle", "truncated", "state_dict", "newer"):
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.read(bad[name])
        assert str(e.value).startswith(f"checkpoint {bad[name]} ") and re.search(EXPECTED[name], str(e.value))


def test_resume_needs_the_training_state(run_dir: Path, tmp_path: Path) -> None:
    raw = checkpoint.read(run_dir / "run" / "ckpt.pt")
    checkpoint.save(tmp_path / "stripped.pt", {k: v for k, v in raw.items() if k not in ("format", "train")})
    old = {**raw["train"]}
    del old["data_sha256"]
    checkpoint.save(tmp_path / "old.pt", {**{k: v for k, v in raw.items() if k != "format"}, "train": old})
    stripped, other = in_parallel(("rnn-train", "--resume", str(tmp_path / "stripped.pt")),
                                  ("rnn-train", "--resume", str(tmp_path / "old.pt")))
    assert stripped.returncode == 2 and "holds no training state (exported or stripped): cannot resume" in \
        one_error_line(stripped, "rnn-train")
    assert other.returncode == 2 and "its training state lacks ['data_sha256'] (written by another version" in \
        one_error_line(other, "rnn-train")


# -- the exit-code convention -----------------------------------------------------------------------------------

def test_usage_errors_exit_2_before_any_training(run_dir: Path, tmp_path: Path) -> None:
    corpus = str(run_dir / "corpus.txt")
    (tmp_path / "a-file").write_text("x")
    cases = {  # more of them, in-process: tests/test_train.py::test_cli_errors_are_clear
        ("--data", str(tmp_path / "nope.txt")): f"corpus {tmp_path / 'nope.txt'} does not exist",
        ("--data", corpus, "--eval-chars", "-1"): "argument --eval-chars: must be a number of characters >= 0 or "
                                                  "'all', got -1",
        ("--data", corpus, "--out", str(tmp_path / "a-file")): f"--out {tmp_path / 'a-file'}: cannot write the "
                                                                "run folder there",
        ("--data", corpus, "--batch", "400"): "cannot fill --batch 400 streams of one --seq-len 8-token chunk",
        ("--data", corpus, "--seed", "-1"): "--seed must be an integer from 0 to 4294967295, got -1",
    }
    out = ("--out", str(tmp_path / "out"))
    results = in_parallel(*[("rnn-train", *TINY, "--no-progress", *(() if "--out" in argv else out), *argv)
                            for argv in cases])
    for (argv, message), r in zip(cases.items(), results):
        assert r.returncode == 2, (argv, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr, (argv, r.stderr)
        assert not (tmp_path / "out" / "ckpt.pt").exists(), argv


def test_export_flags_no_repository_takes_are_usage_errors(run_dir: Path, tmp_path: Path) -> None:
    """rnn-export --name or --version that no repository takes: exit 2 naming the flag, before any work; a
    --repo that cannot be created: exit 1 naming --repo (writing the repository failed). Nothing published."""
    ckpt, repo = str(run_dir / "run" / "ckpt.pt"), str(tmp_path / "m")
    (tmp_path / "a-file").write_text("x")
    name, version, unwritable = in_parallel(("rnn-export", ckpt, "--repo", repo, "--name", "../evil"),
                                            ("rnn-export", ckpt, "--repo", repo, "--version", "0"),
                                            ("rnn-export", ckpt, "--repo", str(tmp_path / "a-file" / "m")))
    assert name.returncode == 2 and name.stderr.splitlines()[-1].startswith(
        "rnn-export: error: argument --name: model name '../evil' must match "), name.stderr
    assert version.returncode == 2 and version.stderr.splitlines()[-1] == (
        "rnn-export: error: argument --version: must be a positive integer (or left out: the next free one), got 0")
    assert unwritable.returncode == 1 and one_error_line(unwritable, "rnn-export") == (
        f"--repo {tmp_path / 'a-file' / 'm'}: cannot create the model repository (Not a directory)")
    assert not (tmp_path / "m").exists()


def test_a_model_too_big_to_build_is_one_error_line(run_dir: Path, tmp_path: Path) -> None:
    """--hidden 10^9 asks torch for 4 EB of weights: exit 1 with one line saying so and which flags to
    shrink, no traceback, and no run folder left behind."""
    r = cli("rnn-train", "--data", str(run_dir / "corpus.txt"), "--out", str(tmp_path / "big"), *TINY,
            "--hidden", "1000000000", "--no-progress")
    assert r.returncode == 1, r.stderr
    line = one_error_line(r, "rnn-train")
    assert "can't allocate memory" in line and "while setting up the run, before step 1; --hidden, --layers, " \
        "--embed or --batch may be too large for this machine" in line, line
    assert not (tmp_path / "big" / "ckpt.pt").exists()


def test_a_run_that_fails_after_it_started_exits_1(run_dir: Path, tmp_path: Path) -> None:
    """Diverged (the loss turns inf at step 2 with a huge learning rate): exit 1, ckpt.pt still holds step 1,
    not the broken weights. A checkpoint that cannot be written (ckpt.pt is a folder): exit 1, one line."""
    corpus = str(run_dir / "corpus.txt")
    (tmp_path / "blocked" / "ckpt.pt").mkdir(parents=True)
    diverged, blocked = in_parallel(
        ("rnn-train", "--data", corpus, "--out", str(tmp_path / "diverged"), *TINY, "--steps", "8",
         "--eval-every", "1", "--lr", "1e37", "--clip", "0", "--warmup", "0", "--schedule", "constant",
         "--no-progress"),
        ("rnn-train", "--data", corpus, "--out", str(tmp_path / "blocked"), *TINY, "--steps", "4",
         "--eval-every", "2", "--no-progress"))
    assert diverged.returncode == 1, diverged.stderr
    assert one_error_line(diverged, "rnn-train") == (
        f"the training loss is inf at step 2: the run diverged (try a lower --lr, a --clip, or --warmup); "
        f"{tmp_path / 'diverged'}/ckpt.pt still holds step 1")
    saved = checkpoint.read(tmp_path / "diverged" / "ckpt.pt")
    assert saved["metrics"]["steps"] == 1 and all(bool(torch.isfinite(v).all()) for v in saved["model"].values())
    assert blocked.returncode == 1, blocked.stderr
    msg = one_error_line(blocked, "rnn-train")
    assert msg.startswith("IsADirectoryError: ") and "(after step 2; --log-level DEBUG shows the traceback)" in msg


# -- the progress bar on a terminal: log lines around it, the resume hint on its own line ----------------------

def screen(raw: str) -> list[str]:
    """What a terminal shows for `raw`: carriage returns rewrite the line, ANSI sequences are dropped."""
    lines, cur, col = [], [], 0
    for ch in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw):
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(cur).rstrip())
            cur, col = [], 0
        else:
            if col < len(cur):
                cur[col] = ch
            else:
                cur.append(ch)
            col += 1
    if cur:
        lines.append("".join(cur).rstrip())
    return lines


def test_on_a_terminal_logs_go_around_the_bar_and_ctrl_c_prints_the_hint_alone(run_dir: Path,
                                                                               tmp_path: Path) -> None:
    """rnn-train on a pseudo-terminal, logging every step under its progress bar, then Ctrl-C (SIGINT): no log
    line shares a line with the bar, the bar is still drawn, the run exits 130 and the last line is the resume
    hint, alone, naming a checkpoint that resumes."""
    out = tmp_path / "run"
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))  # 200 columns
    proc = subprocess.Popen([str(BIN / "rnn-train"), "--data", str(run_dir / "corpus.txt"), "--out", str(out),
                             *TINY, "--steps", "100000", "--eval-every", "5", "--log-every", "1"],
                            stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True)
    os.close(secondary)
    raw, deadline, sent = b"", time.monotonic() + 90, False
    try:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            raw += chunk
            if not sent and b"step 12 loss" in raw:
                proc.send_signal(signal.SIGINT)
                sent = True
            assert time.monotonic() < deadline, raw[-2000:]
    finally:
        os.close(primary)
        proc.wait(timeout=60)
    assert sent and proc.returncode == 130, raw[-2000:]
    shown = screen(raw.decode("utf-8", "replace"))
    logs = [x for x in shown if LOG_LINE.search(x)]
    assert len(logs) >= 12 and all(LOG_LINE.match(x) for x in logs), [x for x in logs if not LOG_LINE.match(x)]
    assert not any("step/s" in x or "|" in x for x in logs), [x for x in logs if "step/s" in x or "|" in x]
    assert any("step/s" in x for x in shown), shown[-10:]  # the bar was drawn
    assert any(re.search(r"val_loss \d\.\d{4} \(\d+ held-out chars", x) for x in logs)
    step = int(re.search(r"interrupted at step (\d+)", shown[-1]).group(1))
    assert shown[-1] == (f"rnn-train: interrupted at step {step}; the checkpoint is resumable: "
                         f"`rnn-train --resume {out}/ckpt.pt`"), shown[-3:]
    assert checkpoint.read(out / "ckpt.pt")["metrics"]["steps"] == step


# -- --device and help --------------------------------------------------------------------------------------------

def test_device_auto_cpu_and_cuda(run_dir: Path, tmp_path: Path) -> None:
    """--device auto trains on cuda where torch sees a GPU, else on the CPU, and says which and why; a GPU that
    torch does not see (cuda:N past the last, or any cuda without one) is a usage error naming --device."""
    corpus = str(run_dir / "corpus.txt")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    auto, far = in_parallel(("rnn-train", "--data", corpus, "--out", str(tmp_path / "auto"), *TINY, "--steps", "2",
                             "--device", "auto"),  # stderr is a pipe here: no bar without --no-progress either
                            ("rnn-train", "--data", corpus, "--out", str(tmp_path / "far"), *TINY, "--device",
                             f"cuda:{n}"))
    assert auto.returncode == 0, auto.stderr
    want = "cuda" if n else "cpu"
    assert re.search(rf"--device auto: {want} \((.+)\)", auto.stderr), auto.stderr
    assert re.search(rf"val chars on {want}\n", auto.stderr), auto.stderr
    assert "step/s" not in auto.stderr and "%|" not in auto.stderr, auto.stderr  # the bar only on a terminal
    assert far.returncode == 2 and f"--device cuda:{n}" in one_error_line(far, "rnn-train")
    assert not (tmp_path / "far").exists()


def test_help_shows_every_default_and_what_0_means() -> None:
    r = cli("rnn-train", "-h")
    assert r.returncode == 0
    blocks: dict[str, str] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"  (-[-\w]+)", line)
        if m:
            flag = m.group(1)
            blocks[flag] = line
        elif line.startswith("      ") and blocks:
            blocks[flag] += " " + line.strip()
    no_default = {"-h", "--data", "--resume", "--stop-at", "--series", "--test"}  # absent unless given
    assert len(blocks) > 40
    for flag, block in blocks.items():
        assert flag in no_default or "default" in block, block
    text = re.sub(r"\s+", " ", r.stdout)
    for phrase in ("--eval-chars N score each validation pass on the first N characters",
                   "0 or 'all' = all of it, every pass (default: 10000)", "(default: 1000)",
                   "0 = as many as torch picks (default: 0)", "<= 0 = no clipping (default: 1.0)",
                   "0 = never (default: 100)", "or cuda:N (default: cpu)", "exit status: 0 done; 1",
                   "2 usage error", "130 interrupted"):
        assert phrase in text, phrase

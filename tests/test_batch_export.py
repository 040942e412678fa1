"""rnn-export batch and list: failures reported without stopping, idempotent reruns, clash-free concurrent
publishing, and no partial version after kill -9."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_TEXT, save_tiny_checkpoint, tiny_model
from rnnserve.server.contract import ModelFormatError, verify_version_dir, version_numbers
from rnnserve.trainer import checkpoint
from rnnserve.trainer import onnx_graph as og
from rnnserve.trainer.batch_export import main_batch
from rnnserve.trainer.listing import main_list, scan

BIN = Path(sys.executable).parent
VOCAB = sorted(set(TINY_TEXT))
CELLS = ("elman", "gru", "lstm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """30 small seeded checkpoints, c00..c29 (cells and layer counts rotate)."""
    folder = tmp_path_factory.mktemp("ckpts")
    return [save_tiny_checkpoint(folder / f"c{i:02d}.pt", tiny_model(CELLS[i % 3], 16, 1 + (i % 2), "zeros", 100 + i,
                                                                     len(VOCAB)), val_loss=3.0 + i / 100, steps=i)
            for i in range(30)]


def content(ckpt: Path) -> str:
    loaded = checkpoint.load(ckpt)
    return og.content_hash(loaded.model, loaded.vocab)


def published(repo: Path) -> list[Path]:
    return sorted(repo.glob("*/[0-9]*"))


def test_batch_reports_broken_publishes_rest_and_rerun_skips(tmp_path: Path, ckpts: list[Path],
                                                             capsys: pytest.CaptureFixture) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpts[0].read_bytes()[:500])  # a truncated checkpoint
    listing = tmp_path / "list.txt"
    listing.write_text(f"# sweep\n{ckpts[2]}\n\n{broken}\n")
    repo, report = tmp_path / "repo", tmp_path / "report.json"
    glob_arg = str(ckpts[0].parent / "c0[01].pt")
    rc = main_batch([glob_arg, str(tmp_path / "none-*.pt"), "--from-file", str(listing), "--repo", str(repo),
                     "--report", str(report), "--no-progress", "--eval-corpus", _corpus(tmp_path)])
    out = capsys.readouterr()
    assert rc == 1
    rows = json.loads(report.read_text())["results"]
    by_ckpt = {Path(r["checkpoint"]).name: r for r in rows}
    assert by_ckpt["broken.pt"]["status"] == "failed" and "cannot be read" in by_ckpt["broken.pt"]["error"]
    assert by_ckpt["none-*.pt"]["status"] == "failed" and "no checkpoint matches" in by_ckpt["none-*.pt"]["error"]
    assert "FAILED" in out.err and str(broken) in out.err and "Traceback" not in out.err
    for name in ("c00.pt", "c01.pt", "c02.pt"):
        r = by_ckpt[name]
        assert r["status"] == "ok" and r["version"] == 1 and r["parity"] < 1e-5 and r["error"] is None
        assert r["sizes"]["model.onnx"] > 1000 and r["seconds"] > 0
        meta = verify_version_dir(r["path"])
        assert meta["source"]["content_sha256"] == content(ckpts[int(name[1:3])])
        assert meta["metrics"]["val_loss_torch"] == pytest.approx(3.0 + int(name[1:3]) / 100)
        assert r["val_loss"] == meta["metrics"]["val_loss"] and 2.0 < r["val_loss"] < 5.0  # onnxruntime's
    assert "2 failed" in out.out and "3 ok" in out.out
    before = {p: (p / "model.json").stat().st_mtime_ns for p in published(repo)}
    rc = main_batch([glob_arg, str(ckpts[2]), "--repo", str(repo), "--report", str(report), "--no-progress",
                     "--eval-corpus", _corpus(tmp_path)])
    assert rc == 0
    assert [r["status"] for r in json.loads(report.read_text())["results"]] == ["skipped"] * 3
    assert {p: (p / "model.json").stat().st_mtime_ns for p in published(repo)} == before  # nothing rewritten
    # the same weights, config and vocab in another file (say, different optimizer state): still skipped
    raw = checkpoint.read(ckpts[2])
    raw.pop("format")
    resaved = checkpoint.save(tmp_path / "other" / "c02.pt", {**raw, "train": {"note": "resumed elsewhere"}})
    assert resaved.read_bytes() != ckpts[2].read_bytes()
    assert main_batch([str(resaved), "--repo", str(repo), "--report", str(report), "--no-progress",
                       "--eval-corpus", _corpus(tmp_path)]) == 0
    assert json.loads(report.read_text())["results"][0]["status"] == "skipped"
    assert version_numbers(repo / "c02") == [1]
    # a damaged published version is not "already there": it is exported again as a new version
    (repo / "c01" / "1" / "sequence.onnx").write_bytes(b"garbage")
    assert main_batch([str(ckpts[1]), "--repo", str(repo), "--no-progress", "--eval-corpus", _corpus(tmp_path)]) == 0
    assert version_numbers(repo / "c01") == [1, 2] and verify_version_dir(repo / "c01" / "2")["version"] == 2
    capsys.readouterr()
    assert main_list([str(repo)]) == 0
    listing_out = capsys.readouterr().out
    assert "broken: " in listing_out and "sha256" in listing_out
    rows = {(r["model"], r["version"]): r for r in scan(repo)}
    assert rows[("c01", 2)]["default"] and not rows[("c01", 1)]["default"] and rows[("c00", 1)]["default"]
    assert rows[("c02", 1)]["cell"] == "lstm" and rows[("c00", 1)]["val_loss"] is not None


def _corpus(tmp_path: Path) -> str:
    p = tmp_path / "corpus.txt"
    p.write_text(TINY_TEXT)
    return str(p)


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main_batch(["--repo", str(tmp_path)])
    assert e.value.code == 2 and "no checkpoints given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main_batch(["--from-file", str(tmp_path / "missing.txt")])
    assert e.value.code == 2 and "missing.txt" in capsys.readouterr().err
    assert main_list([str(tmp_path / "nope")]) == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a name no repository takes: refused before any export
        main_batch([str(tmp_path / "x.pt"), "--repo", str(tmp_path / "m"), "--name", "../x"])
    assert e.value.code == 2 and "argument --name: model name '../x' must match" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def _batch(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "rnn-export"), "batch", "--no-progress", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_concurrent_batches_get_distinct_complete_versions(tmp_path: Path, ckpts: list[Path]) -> None:
    repo = tmp_path / "repo"
    a = _batch([*map(str, ckpts[3:6]), "--repo", str(repo), "--name", "sweep", "--jobs", "2"])
    b = _batch([*map(str, ckpts[6:9]), "--repo", str(repo), "--name", "sweep"])
    for p in (a, b):
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert version_numbers(repo / "sweep") == list(range(1, 7))
    hashes = {verify_version_dir(d)["source"]["content_sha256"] for d in published(repo)}
    assert hashes == {content(c) for c in ckpts[3:9]}
    assert not [p for p in (repo / "sweep").iterdir() if p.name.startswith(".tmp-")]


def test_kill_9_leaves_no_partial_version(tmp_path: Path, ckpts: list[Path]) -> None:
    repo = tmp_path / "repo"
    proc = _batch([str(ckpts[0].parent / "c1*.pt"), "--repo", str(repo), "--name", "nightly"],
                  start_new_session=True)
    deadline = time.monotonic() + 60
    while len(version_numbers(repo / "nightly")) < 2:  # wait until it is well under way
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no versions published within 60 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    done = version_numbers(repo / "nightly")
    assert 2 <= len(done) < 10
    for v in done:  # everything that looks like a version is complete
        assert verify_version_dir(repo / "nightly" / str(v))["version"] == v
    for tmp in (repo / "nightly").glob(".tmp-*"):  # a half-written folder is never accepted
        with pytest.raises(ModelFormatError):
            verify_version_dir(tmp)
    assert all(r["status"] == "ok" for r in scan(repo))
    assert {r["version"] for r in scan(repo)} == set(done)
    rc = main_batch([str(ckpts[0].parent / "c1*.pt"), "--repo", str(repo), "--name", "nightly",  # in-process
                     "--no-progress", "--report", str(tmp_path / "r.json")])
    assert rc == 0
    statuses = [r["status"] for r in json.loads((tmp_path / "r.json").read_text())["results"]]
    assert statuses.count("skipped") == len(done) and statuses.count("ok") == 10 - len(done)
    assert version_numbers(repo / "nightly") == list(range(1, 11))
    assert not list((repo / "nightly").glob(".tmp-*"))  # the killed run's temporaries are cleaned up


def test_list_shows_each_versions_headline_figure(capsys) -> None:
    """A language model's validation loss, a classifier's test accuracy: the figure `rnn-client models`
    shows too (a vector model has no val_loss, so its column used to read '-')."""
    assert main_list([str(Path(__file__).resolve().parents[1] / "models")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[5] == "METRIC", out[0]
    rows = {ln.split()[0]: ln for ln in out[1:] if ln and not ln.startswith("default of")}
    assert "val_loss 1.4840" in rows["shakespeare"] and "test_accuracy 97.6%" in rows["japanese-vowels"], rows

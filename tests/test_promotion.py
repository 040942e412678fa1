"""The promotion rule in a live repository: a worse export never becomes the default, a better one does, an
explicit promotion does, a polling server follows default.json, and `rnn-export list` says which and why."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import pytest
from _live_support import listed, opened, serving, until
from conftest import TINY_TEXT, save_tiny_checkpoint, tiny_model
from rnnserve.server.contract import (
    DEFAULT_FILE,
    DefaultPointer,
    ModelFormatError,
    parse_default,
    read_default,
)
from rnnserve.trainer.batch_export import main_batch
from rnnserve.trainer.export_cli import main as export_main
from rnnserve.trainer.listing import main_list, scan
from rnnserve.trainer.promote import apply_rule, compare, usable

VOCAB = sorted(set(TINY_TEXT))
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoints told apart by their recorded val_loss: good (1.5), fair (2.0), poor (2.5)."""
    folder = tmp_path_factory.mktemp("promo-ckpts")
    return {name: save_tiny_checkpoint(folder / f"{name}.pt", tiny_model("elman", 16, 1, "zeros", seed, len(VOCAB)),
                                       val_loss=loss, steps=seed)
            for name, loss, seed in (("good", 1.5, 71), ("fair", 2.0, 72), ("poor", 2.5, 73))}


def export(capsys: pytest.CaptureFixture, ckpt: Path, repo: Path, *flags: str) -> dict:
    """`rnn-export CKPT --repo REPO --name live ...` in process; its JSON line."""
    capsys.readouterr()
    assert export_main([str(ckpt), "--repo", str(repo), "--name", "live", *flags]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[0])


def listing(capsys: pytest.CaptureFixture, repo: Path) -> str:
    capsys.readouterr()
    assert main_list([str(repo)]) == 0
    return capsys.readouterr().out


def test_a_worse_export_never_becomes_the_default_and_the_server_follows(tmp_path: Path, ckpts: dict[str, Path],
                                                                        capsys: pytest.CaptureFixture) -> None:
    repo = tmp_path / "repo"
    first = export(capsys, ckpts["fair"], repo)
    assert first["promoted"] and first["default"] == 1 and "first usable version" in first["promotion"]
    assert read_default(repo / "live").version == 1

    async def main() -> None:
        async with serving(repo) as (_app, _ch, stub):  # --serve-versions 1, polling
            assert await listed(stub) == {("live", 1): True}
            worse = await asyncio.to_thread(export, capsys, ckpts["poor"], repo)
            assert not worse["promoted"] and worse["default"] == 1
            assert "val_loss 2.5000 > 2.0000 of version 1" in worse["promotion"]
            assert "rnn-export promote" in worse["promotion"]
            # version 2 is loaded (a smoke test can pin it) but new sessions still get version 1
            await until(lambda: _listed_is(stub, {("live", 1): True, ("live", 2): False}), "version 2 beside 1")
            assert (await opened(stub, "live")).model.version == 1
            assert (await opened(stub, "live", 2)).model.version == 2

            better = await asyncio.to_thread(export, capsys, ckpts["good"], repo)
            assert better["promoted"] and better["default"] == 3
            assert "val_loss 1.5000 <= 2.0000 of version 1" in better["promotion"]
            await until(lambda: _listed_is(stub, {("live", 3): True}), "version 3 to be the default, alone")
            assert (await opened(stub, "live")).model.version == 3

            capsys.readouterr()
            assert export_main(["promote", str(repo), "live", "1", "--reason", "rollback: 3 misbehaves"]) == 0
            assert "live version 1 is the default: rollback: 3 misbehaves" in capsys.readouterr().out
            await until(lambda: _listed_is(stub, {("live", 1): True, ("live", 3): False}), "the rollback to 1")
            assert (await opened(stub, "live")).model.version == 1

    asyncio.run(main())
    out = listing(capsys, repo)
    assert "default of live: version 1: rollback: 3 misbehaves" in out
    rows = {r["version"]: r for r in scan(repo)}
    assert [v for v, r in rows.items() if r["default"]] == [1] and rows[1]["default_reason"] == "rollback: 3 misbehaves"


async def _listed_is(stub, want: dict) -> bool:
    return await listed(stub) == want


def test_rules_always_never_and_what_cannot_be_compared(tmp_path: Path, ckpts: dict[str, Path],
                                                        capsys: pytest.CaptureFixture) -> None:
    repo = tmp_path / "repo"
    export(capsys, ckpts["good"], repo)
    assert export(capsys, ckpts["poor"], repo, "--promote", "always")["promoted"]  # v2 by order
    assert read_default(repo / "live").version == 2
    never = export(capsys, ckpts["good"], repo, "--promote", "never")
    assert not never["promoted"] and never["default"] == 2 and "--promote never" in never["promotion"]
    # a version without a val_loss is not comparable: never promoted by the rule, and it says why
    meta = json.loads((repo / "live" / "3" / "model.json").read_text())
    meta["metrics"]["val_loss"] = None
    (repo / "live" / "3" / "model.json").write_text(json.dumps(meta))  # model.json carries no checksum of itself
    d = apply_rule(repo, "live", 3)
    assert not d.promoted and d.default == 2 and "version 3 records no val_loss" in d.reason
    # measured on different eval files: not comparable either
    meta["metrics"]["val_loss"], meta["source"]["eval_corpus_sha256"] = 0.1, "a" * 64
    (repo / "live" / "3" / "model.json").write_text(json.dumps(meta))
    m2 = json.loads((repo / "live" / "2" / "model.json").read_text())
    (repo / "live" / "2" / "model.json").write_text(json.dumps({**m2, "source": {**m2["source"],
                                                                               "eval_corpus_sha256": "b" * 64}}))
    d = apply_rule(repo, "live", 3)
    assert not d.promoted and "different evaluation files" in d.reason
    # vector models: test_loss (lower is better), else test_accuracy (higher is better)
    jv = Path(__file__).resolve().parent.parent / "models" / "japanese-vowels" / "1"
    old = usable(jv)
    worse = json.loads((jv / "model.json").read_text())
    worse["metrics"] = {**worse["metrics"], "test_loss": old.metrics["test_loss"] + 0.1}
    vdir = tmp_path / "jv" / "vowels" / "2"
    shutil.copytree(jv, vdir)
    (vdir / "model.json").write_text(json.dumps({**worse, "version": 2}))
    ok, why = compare(usable(vdir), old, 2, 1)
    assert ok is False and why.startswith("test_loss ")
    del worse["metrics"]["test_loss"]
    (vdir / "model.json").write_text(json.dumps({**worse, "version": 2}))
    old_wo = dataclasses.replace(old, metrics={k: v for k, v in old.metrics.items() if k != "test_loss"})
    ok, why = compare(usable(vdir), old_wo, 2, 1)
    assert ok is True and why.startswith("test_accuracy ") and ">=" in why


def test_batch_export_applies_the_rule_in_order(tmp_path: Path, ckpts: dict[str, Path]) -> None:
    repo, report = tmp_path / "repo", tmp_path / "r.json"
    rc = main_batch([str(ckpts["fair"]), str(ckpts["poor"]), str(ckpts["good"]), "--repo", str(repo), "--name",
                     "live", "--no-progress", "--report", str(report)])
    assert rc == 0
    rows = json.loads(report.read_text())["results"]
    assert [(r["version"], r["promoted"], r["default"]) for r in rows] == [(1, True, 1), (2, False, 1), (3, True, 3)]
    assert "val_loss 2.5000 > 2.0000 of version 1" in rows[1]["promotion"]
    assert read_default(repo / "live").version == 3


def test_broken_or_dangling_pointers_fall_back_to_the_highest_version(tmp_path: Path, ckpts: dict[str, Path],
                                                                       capsys: pytest.CaptureFixture, caplog) -> None:
    """An old repository (no default.json) serves its highest version; a broken pointer or one naming a
    missing version is logged and falls back, never a crash; the server and the list agree."""
    repo = tmp_path / "repo"
    export(capsys, ckpts["fair"], repo)
    export(capsys, ckpts["good"], repo)
    caplog.set_level(logging.WARNING, logger="rnnserve.server.repository")
    cases = ((None, 2, "highest version (no default.json)"),
             ('{"version": "one"}', 2, "highest version (default.json is broken: "),
             ('{"version": 7, "reason": "gone"}', 2, "highest version (default.json names version 7"),
             ('{"version": 1, "reason": "pinned by ops"}', 1, "pinned by ops"))

    async def main() -> None:
        async with serving(repo, "--serve-versions", "all") as (app, _ch, stub):
            for text, version, why in cases:
                (repo / "live" / DEFAULT_FILE).unlink(missing_ok=True)
                if text is not None:
                    (repo / "live" / DEFAULT_FILE).write_text(text)
                want = {("live", 1): version == 1, ("live", 2): version == 2}
                await until(lambda want=want: _listed_is(stub, want), f"default {version} for {text}")
                await until(lambda why=why: _true(app.engine.repo.default_of("live")[1].startswith(why)),
                            f"the server's reason {why!r}")
                row = next(r for r in scan(repo) if r["default"])
                assert row["version"] == version and row["default_reason"].startswith(why), (text, row)

    asyncio.run(main())
    logged = [r.getMessage() for r in caplog.records]
    assert any("ignoring live/default.json" in m and "version must be a positive integer" in m for m in logged)
    assert any("names version 7, which is not serveable" in m for m in logged), logged


async def _true(value: bool) -> bool:
    return value


def test_the_pointer_format_is_checked() -> None:
    assert parse_default({"version": 3, "reason": "r", "at": "2026-01-01T00:00:00Z"}) == \
        DefaultPointer(3, "r", "2026-01-01T00:00:00Z")
    for bad, needle in (([], "must be a JSON object"), ({"version": 0}, "positive integer"),
                        ({"version": True}, "positive integer"), ({"version": 1, "verison": 2}, "unknown key"),
                        ({"version": 1, "reason": 5}, "reason must be a string")):
        with pytest.raises(ModelFormatError, match=needle):
            parse_default(bad)


def test_shipped_models_name_their_default() -> None:
    models = Path(__file__).resolve().parent.parent / "models"
    for name in ("shakespeare", "shakespeare-lstm", "japanese-vowels"):
        pointer = read_default(models / name)
        assert pointer is not None and pointer.version == 1 and pointer.reason, name

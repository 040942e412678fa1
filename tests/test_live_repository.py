"""A live model repository under a running server, as it is meant to change: publishing with the real batch
exporter while sessions stream, removing a version under a live session, and the --serve-versions window,
observed over gRPC. The repository's faults (corrupt drops, a killed exporter, versions the contract
refuses) are in test_live_repository_faults.py; what both share is in _live_support.py.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
from _live_support import (
    NF,
    SERVING,
    VOCAB,
    Stream,
    feed_req,
    health,
    holds,
    listed,
    lists,
    logits_of,
    opened,
    serving,
    until,
)
from conftest import Reference, tiny_model
from rnnserve.trainer.export import export_model


@pytest.fixture(autouse=True, scope="module")
def restore_torch_threads():
    """The in-process batch exporter sets torch to one thread; give the rest of the session its own back."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- 1. publish while streaming
def test_publishing_with_the_batch_exporter_while_sessions_stream(tmp_path: Path,
                                                                  live_ckpts: list[Path]) -> None:
    """A generation and a sequence of feeds keep version 1's exact outputs across a batch publish of
    version 2; new sessions get version 2; version 1 can still be opened pinned (latest 2 served)."""
    from rnnserve.trainer.batch_export import main_batch

    repo, report = tmp_path / "repo", tmp_path / "report.json"

    def publish(ckpt: Path) -> dict:
        rc = main_batch([str(ckpt), "--repo", str(repo), "--name", "live", "--no-progress", "--report", str(report)])
        row = json.loads(report.read_text())["results"][0]
        assert rc == 0 and row["status"] == "ok", row
        return row

    assert publish(live_ckpts[0])["version"] == 1
    ref_gen, ref_feed = Reference(repo, "live", 1), Reference(repo, "live", 1)
    temperature, seed = 0.9, 1234

    async def main() -> None:
        async with serving(repo, "--serve-versions", "2", max_generate_tokens=10**7) as (_app, _ch, stub):
            gen, feeder = Stream(stub), Stream(stub)
            for st in (gen, feeder):
                r = await st.send(open=pb.Open(model=pb.ModelRef(name="live")))
                assert r.opened.model.version == 1 and r.opened.model.latest
            prompt = [VOCAB.index(c) for c in "First Citizen:"]
            await gen.send(feed=pb.Feed(tokens=pb.TokenIds(ids=prompt), output=pb.OUTPUT_NONE))
            ref_gen.feed(prompt)
            first = await gen.send(generate=pb.Generate(max_tokens=10**7, temperature=temperature, seed=seed,
                                                        chunk_tokens=64))
            reader = asyncio.ensure_future(gen.rest_of_generation(first))  # an endless generation streams on
            ids = [(7 * i) % len(VOCAB) for i in range(24)]  # multi-token feeds: sequence.onnx, beside the row
            r = await feeder.send(feed=feed_req(ids[:8]))
            np.testing.assert_allclose(logits_of(r.fed), ref_feed.feed(ids[:8]), atol=1e-5)

            row = await asyncio.to_thread(publish, live_ckpts[1])  # the real batch exporter, while all that runs
            assert row["version"] == 2 and row["parity"] < 1e-5
            await until(lambda: lists(stub, {("live", 1): False, ("live", 2): True}),
                        "version 2 to be listed as latest beside version 1")
            assert not reader.done(), "the generation ended before version 2 arrived: nothing was tested"

            new = await opened(stub, "live")  # a new session gets the new version
            assert new.model.version == 2 and new.model.latest
            r2 = await stub.Step(pb.StepRequest(session_id=new.session_id, feed=feed_req(ids[:5])))
            np.testing.assert_allclose(logits_of(r2.result), Reference(repo, "live", 2).feed(ids[:5]), atol=1e-5)
            pinned = await opened(stub, "live", 1)  # the old one is still served, pinned
            assert pinned.model.version == 1 and not pinned.model.latest
            r1 = await stub.Step(pb.StepRequest(session_id=pinned.session_id, feed=feed_req(ids[:5])))
            np.testing.assert_allclose(logits_of(r1.result), Reference(repo, "live", 1).feed(ids[:5]), atol=1e-5)

            for k in (8, 16):  # the feeder carries on from its own state on version 1
                r = await feeder.send(feed=feed_req(ids[k:k + 8]))
                np.testing.assert_allclose(logits_of(r.fed), ref_feed.feed(ids[k:k + 8]), atol=1e-5)
            assert r.fed.steps == 24

            await stub.CloseSession(pb.CloseSessionRequest(session_id=gen.sid))  # end the endless generation
            chunks = await reader
            assert chunks[-1].done and chunks[-1].finish_reason == pb.FINISH_REASON_CANCELLED
            got = [t for c in chunks for t in c.tokens]
            assert len(got) > 64, len(got)
            # the last chunk's count includes a step that was still in flight when the close landed
            assert chunks[-1].steps == len(prompt) + len(got), (chunks[-1].steps, len(prompt), len(got))
            assert got == ref_gen.generate(len(got), temperature, 0, 0.0, seed), "the generation left version 1's outputs"
            for st in (gen, feeder):
                await st.end()

    asyncio.run(main())



# ----------------------------------------------------------------------------- 2. remove a version
def test_a_removed_version_keeps_its_live_session_then_unloads(tmp_path: Path, live_three: Path,
                                                               caplog) -> None:
    """rm -rf of the latest version: it leaves ListModels and refuses new (pinned) sessions with NOT_FOUND,
    the session already on it goes on with its outputs, and it unloads when that session closes."""
    repo = tmp_path / "repo"
    shutil.copytree(live_three, repo)
    ref3 = Reference(repo, "live", 3)  # loaded now: the folder is about to go

    async def main() -> None:
        async with serving(repo, "--serve-versions", "all") as (app, ch, stub):
            assert await listed(stub) == {("live", 1): False, ("live", 2): False, ("live", 3): True}
            st = Stream(stub)
            r = await st.send(open=pb.Open(model=pb.ModelRef(name="live")))
            assert r.opened.model.version == 3
            r = await st.send(feed=feed_req([1, 2, 3]))
            np.testing.assert_allclose(logits_of(r.fed), ref3.feed([1, 2, 3]), atol=1e-5)

            shutil.rmtree(repo / "live" / "3")
            await until(lambda: lists(stub, {("live", 1): False, ("live", 2): True}),
                        "version 3 to leave ListModels and version 2 to become the latest")
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await opened(stub, "live", 3)
            assert e.value.code() == NF, e.value
            assert "'live' version 3 was removed from the repository" in e.value.details(), e.value
            assert "only finishes its 1 live ones" in e.value.details(), e.value
            assert (await opened(stub, "live")).model.version == 2  # new sessions go to the new latest
            assert await health(ch) == SERVING

            for ids in ([4, 5], [6, 7, 8]):  # the live session still runs version 3, from its own state
                r = await st.send(feed=feed_req(ids))
                np.testing.assert_allclose(logits_of(r.fed), ref3.feed(ids), atol=1e-5)
            first = await st.send(generate=pb.Generate(max_tokens=40, temperature=0.8, seed=9, chunk_tokens=16))
            chunks = await st.rest_of_generation(first)
            assert [t for c in chunks for t in c.tokens] == ref3.generate(40, 0.8, 0, 0.0, 9)
            assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH and chunks[-1].steps == 3 + 2 + 3 + 40
            assert any(mv.key == "live:3" for mv in app.engine.batchers), "unloaded under a live session"

            with caplog.at_level(logging.INFO, logger="rnnserve.server.models"):
                await st.send(close=pb.Close())
                await st.end()
                # the log line, not the batcher table: the engine drops the batcher, then awaits its stop, then logs
                await until(lambda: holds(any("unloaded" in r.getMessage() for r in caplog.records)),
                            "version 3 to unload after its last session closed")
            assert not any(mv.key == "live:3" for mv in app.engine.batchers)
            assert [r.getMessage() for r in caplog.records if "unloaded" in r.getMessage()] == ["unloaded live:3"]
            assert await listed(stub) == {("live", 1): False, ("live", 2): True}
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await opened(stub, "live", 3)
            assert e.value.code() == NF

    asyncio.run(main())




# ----------------------------------------------------------------------------- 3. --serve-versions
def test_serve_versions_latest_n_or_all_in_list_models_and_kserve_metadata(tmp_path: Path,
                                                                           live_three: Path) -> None:
    """--serve-versions 2 serves the latest two (and moves with a new publish), `all` every version; the
    native ListModels shows each version with `latest`, KServe ModelMetadata lists the same versions."""
    import tritonclient.grpc.aio as tca
    from tritonclient.utils import InferenceServerException

    repo = tmp_path / "repo"
    shutil.copytree(live_three, repo)

    async def kserve_versions(port: int, version: str = "") -> list[str]:
        client = tca.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            return list((await client.get_model_metadata("live", version)).versions)
        finally:
            await client.close()

    async def main() -> None:
        async with serving(repo, "--serve-versions", "2") as (app, _ch, stub):
            assert await listed(stub) == {("live", 2): False, ("live", 3): True}
            cells = {m.version: m.cell for m in (await stub.ListModels(pb.ListModelsRequest())).models}
            assert cells == {2: "gru", 3: "lstm"}
            assert await kserve_versions(app.port) == ["2", "3"] == await kserve_versions(app.port, "2")
            with pytest.raises(InferenceServerException) as e:
                await kserve_versions(app.port, "1")
            assert "NOT_FOUND" in str(e.value.status()) and "version 1" in e.value.message()
            with pytest.raises(grpc.aio.AioRpcError) as e2:
                await opened(stub, "live", 1)
            assert e2.value.code() == NF
            assert (await opened(stub, "live", 2)).model.version == 2
            # a fourth version arrives: the window moves to 3 and 4
            path = export_model(tiny_model("elman", 16, 1, "zeros", 77, len(VOCAB)), VOCAB, repo, "live")
            assert path.name == "4"
            await until(lambda: lists(stub, {("live", 3): False, ("live", 4): True}), "the window to move to 3, 4")
            assert await kserve_versions(app.port) == ["3", "4"]
        async with serving(repo, "--serve-versions", "all") as (app, _ch, stub):
            assert await listed(stub) == {("live", 1): False, ("live", 2): False, ("live", 3): False,
                                          ("live", 4): True}
            assert await kserve_versions(app.port) == ["1", "2", "3", "4"]
            assert (await opened(stub, "live", 1)).model.version == 1
            assert (await opened(stub, "live")).model.version == 4

    asyncio.run(main())



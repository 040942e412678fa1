"""The native server in-process on 127.0.0.1 port 0: real grpc.aio, real onnxruntime, the tiny repository."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import urllib.request
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
from conftest import Reference, SessionStream, started
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rnnserve.server.app import App
from rnnserve.server.settings import Settings

IA, NF, FP, RE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                  grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)


@asynccontextmanager
async def serving(repo: Path, **kw):
    """An App on an ephemeral port with a channel and stub to it."""
    s = dataclasses.replace(Settings(models=repo, host="127.0.0.1", port=0, metrics_port=-1, poll_interval=0,
                                     session_store="memory"), **kw)
    app = App(s)
    async with started(app) as running:
        yield running


def logits_of(resp: pb.SessionResponse) -> np.ndarray:
    return np.array([d.logits for d in resp.fed.distributions], np.float32)


@pytest.mark.parametrize("model", ["tiny", "tiny-lstm"])
def test_no_state_crossover_under_random_interleaving(tiny_repo: Path, model: str) -> None:
    vocab = json.loads((tiny_repo / model / "1" / "model.json").read_text())["vocab"]
    V = len(vocab)

    async def client(stub, k: int, rng: random.Random) -> None:
        st, ref = SessionStream(stub), Reference(tiny_repo, model)
        assert (await st.send(open=pb.Open(model=pb.ModelRef(name=model)))).WhichOneof("kind") == "opened"
        for _ in range(8):
            await asyncio.sleep(rng.random() * 0.004)
            op = rng.choice(["step", "step", "text", "greedy", "sample"])
            if op == "step" or ref.logits is None:
                ids = [rng.randrange(V)]
                r = await st.send(feed=pb.Feed(tokens=pb.TokenIds(ids=ids), output=pb.OUTPUT_LAST, logits=True))
                np.testing.assert_allclose(logits_of(r), ref.feed(ids)[-1:], atol=1e-5)
            elif op == "text":
                text = "".join(rng.choice(vocab) for _ in range(rng.randrange(2, 9)))
                r = await st.send(feed=pb.Feed(text=text, output=pb.OUTPUT_ALL, logits=True))
                np.testing.assert_allclose(logits_of(r), ref.feed([vocab.index(c) for c in text]), atol=1e-5)
            else:
                n, seed = rng.randrange(3, 40), rng.randrange(1 << 30)
                params = (0.0, 0, 0.0) if op == "greedy" else (0.9, rng.choice([0, 5]), rng.choice([0.0, 0.9]))
                got, chunks = await st.generate(max_tokens=n, temperature=params[0], top_k=params[1],
                                                top_p=params[2], seed=seed, chunk_tokens=7)
                assert got == ref.generate(n, *params, seed), f"client {k} {op}"
                assert chunks[-1].chunk.finish_reason == pb.FINISH_REASON_LENGTH
                assert "".join(c.chunk.text for c in chunks) == "".join(vocab[t] for t in got)
        await st.end()

    async def main() -> None:
        async with serving(tiny_repo, max_wait_ms=1.0) as (app, _ch, stub):
            await asyncio.gather(*(client(stub, k, random.Random(k)) for k in range(12)))
            reg = app.metrics.registry
            count = reg.get_sample_value("rnnserve_batch_size_count", {"model": model, "version": "1"})
            ones = reg.get_sample_value("rnnserve_batch_size_bucket", {"model": model, "version": "1", "le": "1.0"})
            assert count > ones, "no step call ever batched more than one session"

    asyncio.run(main())


def test_resume_after_disconnect_and_state_round_trip(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo) as (_app, _ch, stub):
            ref = Reference(tiny_repo)
            st = SessionStream(stub)
            await st.send(open=pb.Open(model=pb.ModelRef(name="tiny", version=1)))
            await st.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2, 3]), output=pb.OUTPUT_NONE))
            ref.feed([1, 2, 3])
            st.call.cancel()  # the client goes away
            st2 = SessionStream(stub)
            r = await st2.send(resume=pb.Resume(session_id=st.sid))
            assert r.opened.resumed and r.opened.steps == 3 and r.session_id == st.sid
            r = await st2.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[4]), output=pb.OUTPUT_LAST, logits=True))
            np.testing.assert_allclose(logits_of(r), ref.feed([4]), atol=1e-5)
            assert r.fed.steps == 4
            # get/set state: a fresh session given the exported state continues identically
            got = await stub.GetState(pb.GetStateRequest(session_id=st.sid))
            np.testing.assert_allclose(np.array(got.state), ref.state[0], atol=1e-6)
            other = await stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"),
                                                                              initial=pb.INITIAL_STATE_ZEROS)))
            put = await stub.SetState(pb.SetStateRequest(session_id=other.session_id, state=got.state))
            assert list(put.state) == list(got.state)
            a = await stub.Step(pb.StepRequest(session_id=other.session_id,
                                               feed=pb.Feed(text="", tokens=pb.TokenIds(ids=[5]), logits=True,
                                                            output=pb.OUTPUT_LAST)))
            np.testing.assert_allclose(np.array(a.result.distributions[0].logits), ref.feed([5])[0], atol=1e-5)
            await st2.end()

    asyncio.run(main())


def test_bad_inputs_get_their_code_and_leave_the_session_unchanged(tiny_repo: Path) -> None:
    vocab = json.loads((tiny_repo / "tiny" / "1" / "model.json").read_text())["vocab"]

    async def main() -> None:
        async with serving(tiny_repo, max_generate_tokens=100, max_message_bytes=4096) as (_a, _c, stub):
            st = SessionStream(stub)
            r = await st.send(feed=pb.Feed(text="a"))
            assert r.error.code == FP.value[0] and "first message must be open" in r.error.message
            r = await st.send(open=pb.Open(model=pb.ModelRef(name="nope")))
            assert r.error.code == NF.value[0] and "'nope'" in r.error.message
            await st.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
            r = await st.send(generate=pb.Generate(max_tokens=5))
            assert r.error.code == FP.value[0] and "feed at least one token" in r.error.message
            await st.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2])))
            before = (await stub.GetState(pb.GetStateRequest(session_id=st.sid)))
            bad = [
                (pb.SessionRequest(feed=pb.Feed(text=vocab[0] + vocab[1] + "\u20ac")), IA, "'\u20ac'"),
                (pb.SessionRequest(feed=pb.Feed(tokens=pb.TokenIds(ids=[0, 99999]))), IA, "99999"),
                (pb.SessionRequest(feed=pb.Feed(tokens=pb.TokenIds(ids=[-1]))), IA, "-1"),
                (pb.SessionRequest(feed=pb.Feed()), IA, "no input"),
                (pb.SessionRequest(reset=pb.Reset(initial=pb.INITIAL_STATE_GIVEN, state=[0.0] * 3)), IA, "length 3"),
                (pb.SessionRequest(generate=pb.Generate(max_tokens=101)), IA, "limit of 100"),
                (pb.SessionRequest(generate=pb.Generate(max_tokens=0)), IA, "max_tokens"),
                (pb.SessionRequest(generate=pb.Generate(max_tokens=5, temperature=-1)), IA, "temperature"),
                (pb.SessionRequest(generate=pb.Generate(max_tokens=5, top_p=1.5)), IA, "top_p"),
                (pb.SessionRequest(), IA, "empty request"),
            ]
            for req, code, needle in bad:
                kind = req.WhichOneof("kind")
                r = await st.send(**({kind: getattr(req, kind)} if kind else {}))
                assert r.WhichOneof("kind") == "error" and r.error.code == code.value[0], (needle, r)
                assert needle in r.error.message, (needle, r.error.message)
                after = await stub.GetState(pb.GetStateRequest(session_id=st.sid))
                assert after.state == before.state and after.steps == before.steps, needle
            # unary calls fail with the status itself
            for call, req, code in [
                (stub.SetState, pb.SetStateRequest(session_id=st.sid, state=[1.0]), IA),
                (stub.Step, pb.StepRequest(session_id=st.sid, feed=pb.Feed(text="\u20ac")), IA),
                (stub.GetState, pb.GetStateRequest(session_id="no-such-id"), NF),
                (stub.Step, pb.StepRequest(session_id=st.sid, feed=pb.Feed(text="a" * 5000)), RE),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(req)
                assert e.value.code() == code, e.value
            # the session still works and its state was never touched
            after = await stub.GetState(pb.GetStateRequest(session_id=st.sid))
            assert after.state == before.state
            toks, _ = await st.generate(max_tokens=5)
            assert len(toks) == 5
            await st.end()

    asyncio.run(main())


def test_closed_expired_unknown_and_the_session_cap(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo, idle_timeout=1.0, max_sessions=2) as (_a, _c, stub):
            def op(model="tiny"):
                return pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=model)))
            a = await stub.OpenSession(op())
            b = await stub.OpenSession(op())
            assert len({a.session_id, b.session_id}) == 2 and len(a.session_id) >= 22
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.OpenSession(op())
            assert e.value.code() == RE and "maximum of 2" in e.value.details()
            await stub.CloseSession(pb.CloseSessionRequest(session_id=a.session_id))
            for sid, needle in [(a.session_id, "was closed"), ("never-seen", "unknown")]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetState(pb.GetStateRequest(session_id=sid))
                assert e.value.code() == NF and needle in e.value.details()
            c = await stub.OpenSession(op())  # a slot was freed
            for _ in range(3):  # used sessions stay alive past the timeout
                await asyncio.sleep(0.4)
                await stub.GetState(pb.GetStateRequest(session_id=c.session_id))
            await asyncio.sleep(2.0)
            for sid in (b.session_id, c.session_id):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.GetState(pb.GetStateRequest(session_id=sid))
                assert e.value.code() == NF and "expired after 1 s idle" in e.value.details()
            st = SessionStream(stub)
            r = await st.send(resume=pb.Resume(session_id=b.session_id))
            assert r.error.code == NF.value[0] and "expired" in r.error.message
            await st.end()

    asyncio.run(main())


def test_cancelling_a_generation_frees_its_batch_slot(tiny_repo: Path) -> None:
    async def wait_for(cond, timeout=5.0):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not cond():
            assert loop.time() < end, "condition not reached"
            await asyncio.sleep(0.01)

    async def main() -> None:
        async with serving(tiny_repo) as (app, _c, stub):
            streams = [SessionStream(stub) for _ in range(3)]
            for st in streams:
                await st.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
                await st.send(feed=pb.Feed(text=json.loads((tiny_repo / "tiny/1/model.json").read_text())["vocab"][1]))
                r = await st.send(generate=pb.Generate(max_tokens=4096, temperature=1.0, chunk_tokens=8))
                assert r.chunk.tokens
            await wait_for(lambda: app.engine.stats("tiny")["generating"] == 3)
            streams[0].call.cancel()
            await wait_for(lambda: app.engine.stats("tiny")["generating"] == 2)
            await wait_for(lambda: app.engine.stats("tiny")["last_batch"] == 2)
            # the cancelled session keeps the state it reached and can go on
            st = SessionStream(stub)
            r = await st.send(resume=pb.Resume(session_id=streams[0].sid))
            assert 1 < r.opened.steps < 4097
            toks, _ = await st.generate(max_tokens=3)
            assert len(toks) == 3
            # closing a generating session from elsewhere ends its generation with CANCELLED
            await stub.CloseSession(pb.CloseSessionRequest(session_id=streams[1].sid))
            while not (r := await streams[1].call.read()).chunk.done:
                pass
            assert r.chunk.finish_reason == pb.FINISH_REASON_CANCELLED
            await wait_for(lambda: app.engine.stats("tiny")["generating"] == 1)
            r = await streams[1].send(feed=pb.Feed(tokens=pb.TokenIds(ids=[1])))
            assert r.error.code == NF.value[0] and "was closed" in r.error.message
            streams[2].call.cancel()
            await wait_for(lambda: app.engine.stats("tiny")["generating"] == 0)
            await st.end()

    asyncio.run(main())


def test_health_reflection_models_and_metrics(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo, metrics_port=0) as (app, ch, stub):
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "rnnserve.v1.RnnServe"):
                r = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert r.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(ch)
            names = set()
            async for r in refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                names |= {s.name for s in r.list_services_response.service}
            assert {"rnnserve.v1.RnnServe", "grpc.health.v1.Health"} <= names
            models = (await stub.ListModels(pb.ListModelsRequest())).models
            tiny = next(m for m in models if m.name == "tiny")
            assert tiny.version == 1 and tiny.latest and tiny.state_size > 0 and len(tiny.vocab) > 1
            await stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"))))
            body = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics").read().decode())
            assert 'rnnserve_live_sessions{model="tiny",version="1"} 1.0' in body and "rnnserve_batch_size" in body

    asyncio.run(main())


def test_a_new_version_is_picked_up_and_live_sessions_stay_on_theirs(tiny_repo: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()

    async def main() -> None:
        async with serving(repo, poll_interval=0.1) as (app, ch, stub):
            health = health_pb2_grpc.HealthStub(ch)
            check = health_pb2.HealthCheckRequest(service="")
            assert (await health.Check(check)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            shutil.copytree(tiny_repo / "tiny", repo / "tiny")  # the first model appears
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while (await health.Check(check)).status != health_pb2.HealthCheckResponse.SERVING:
                assert loop.time() < end, "never SERVING after a model appeared"
                await asyncio.sleep(0.05)
            old = SessionStream(stub)
            r = await old.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
            assert r.opened.model.version == 1
            ref = Reference(repo, "tiny", 1)
            shutil.copytree(repo / "tiny" / "1", tmp_path / "v2")
            meta = json.loads((tmp_path / "v2" / "model.json").read_text())
            meta["version"] = 2
            (tmp_path / "v2" / "model.json").write_text(json.dumps(meta))
            (tmp_path / "v2").rename(repo / "tiny" / "2")  # published atomically
            end = loop.time() + 10
            while app.engine.model("tiny").version != 2:
                assert loop.time() < end, "version 2 was not picked up"
                await asyncio.sleep(0.05)
            new = await stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="tiny"))))
            assert new.model.version == 2 and new.model.latest
            r = await old.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2]), output=pb.OUTPUT_ALL, logits=True))
            np.testing.assert_allclose(logits_of(r), ref.feed([1, 2]), atol=1e-5)  # still on version 1
            await old.send(close=pb.Close())
            end = loop.time() + 10
            while any(mv.version == 1 for mv in app.engine.batchers):
                assert loop.time() < end, "version 1 was not unloaded after its last session"
                await asyncio.sleep(0.05)
            await old.end()

    asyncio.run(main())


def test_stop_strings_end_a_generation_and_are_kept(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo) as (_app, _c, stub):
            a, b = SessionStream(stub), SessionStream(stub)
            for st in (a, b):
                await st.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
                await st.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[3, 1, 4])))
            _, chunks = await a.generate(max_tokens=40)
            text = "".join(c.chunk.text for c in chunks)
            stop = text[6:8]
            cut = next(i for i in range(1, len(text) + 1) if text[:i].endswith(stop))
            toks, chunks = await b.generate(max_tokens=40, stop=["\u20ac\u20ac", stop], chunk_tokens=3)
            assert "".join(c.chunk.text for c in chunks) == text[:cut] and len(toks) == cut
            assert chunks[-1].chunk.finish_reason == pb.FINISH_REASON_STOP and chunks[-1].chunk.steps == 3 + cut
            await a.end()
            await b.end()

    asyncio.run(main())

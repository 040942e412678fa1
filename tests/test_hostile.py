"""Heavy and hostile input: long feeds in slices between other sessions' steps, limits refused up front,
non-finite outputs caught per row, undecodable messages, long ids, tiny temperatures, resume during a
feed, and the grace period as a deadline."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
from conftest import SessionStream, started
from onnx import numpy_helper
from rnnserve.server.app import App
from rnnserve.server.contract import sha256_file
from rnnserve.server.kserve import messages
from rnnserve.server.settings import Settings

SHIPPED = Path(__file__).resolve().parent.parent / "models"
IA, NF, FP, RE, UN = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                      grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      grpc.StatusCode.UNAVAILABLE)


def serving(repo: Path, **kw):
    s = dataclasses.replace(Settings(models=repo, host="127.0.0.1", port=0, metrics_port=-1, poll_interval=0,
                                     session_store="memory"), **kw)
    return started(App(s))


def reference(repo: Path, name: str, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sequence.onnx over the whole feed in one call from the model's initial state: (T, V), (S,)."""
    import onnxruntime as ort

    d = repo / name / "1"
    meta = json.loads((d / "model.json").read_text())
    seq = ort.InferenceSession(str(d / "sequence.onnx"), providers=["CPUExecutionProvider"])
    logits, state = seq.run(None, {"tokens": ids[None], "state": np.asarray(meta["initial_state"], np.float32)[None]})
    return logits[0], state[0]


def open_req(name: str = "tiny") -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=name)))


# ----------------------------------------------------------------------------- chunked ingestion
@pytest.mark.parametrize("name", ["tiny", "tiny-lstm"])
def test_a_long_feed_runs_in_slices_between_other_steps_and_lands_exactly(tiny_repo: Path, name: str) -> None:
    """A 6,000-token feed is sliced (others' steps are answered while it runs), yet its logits and final
    state equal one sequence.onnx call over the whole feed."""
    vocab = len(json.loads((tiny_repo / name / "1" / "model.json").read_text())["vocab"])
    ids = np.random.default_rng(0).integers(0, vocab, 6000)
    want_logits, want_state = reference(tiny_repo, name, ids)

    async def main() -> None:
        async with serving(tiny_repo, feed_slice_ms=0.2) as (app, _ch, stub):
            long_sid = (await stub.OpenSession(open_req(name))).session_id
            other = (await stub.OpenSession(open_req(name))).session_id
            feed = asyncio.ensure_future(stub.Step(pb.StepRequest(session_id=long_sid, feed=pb.Feed(
                tokens=pb.TokenIds(ids=ids.tolist()), output=pb.OUTPUT_ALL, logits=True))))
            answered_during = 0
            while not feed.done():
                await stub.Step(pb.StepRequest(session_id=other, feed=pb.Feed(tokens=pb.TokenIds(ids=[1]))))
                answered_during += not feed.done()
            got = (await feed).result
            assert answered_during >= 2, answered_during  # the feed did not hold the batcher for its whole length
            assert got.fed == 6000 and got.steps == 6000
            logits = np.array([d.logits for d in got.distributions], np.float32)
            np.testing.assert_allclose(logits, want_logits, atol=2e-5)
            state = np.array((await stub.GetState(pb.GetStateRequest(session_id=long_sid))).state, np.float32)
            np.testing.assert_allclose(state, want_state, atol=2e-5)
            assert app.engine.batchers[app.engine.model(name)].batches > 20  # many iterations, not one call

    asyncio.run(main())


def test_limits_are_refused_up_front_with_the_limit_named(tiny_repo: Path) -> None:
    """Per request (--max-feed-tokens), in flight (--max-inflight-tokens), and an answer too big to send."""
    async def main() -> None:
        # slices of one token: the first feed below stays in flight long enough for the second to meet it
        async with serving(tiny_repo, max_feed_tokens=5000, max_inflight_tokens=6000, feed_slice_ms=0.001) as (
                app, _ch, stub):
            sid = (await stub.OpenSession(open_req())).session_id
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=[1] * 5001))))
            assert e.value.code() == RE and "--max-feed-tokens" in e.value.details() and "5000" in e.value.details()
            a, b = [(await stub.OpenSession(open_req())).session_id for _ in range(2)]
            first = asyncio.ensure_future(stub.Step(pb.StepRequest(session_id=a, feed=pb.Feed(
                tokens=pb.TokenIds(ids=[1] * 5000), output=pb.OUTPUT_NONE))))
            await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Step(pb.StepRequest(session_id=b, feed=pb.Feed(tokens=pb.TokenIds(ids=[1] * 2000))))
            assert e.value.code() == RE and "--max-inflight-tokens" in e.value.details()
            assert (await first).result.fed == 5000
            # with the first one done, the budget is free again
            await stub.Step(pb.StepRequest(session_id=b, feed=pb.Feed(tokens=pb.TokenIds(ids=[1] * 2000))))
            assert sum(bt.inflight_tokens for bt in app.engine.batchers.values()) == 0

    asyncio.run(main())

    async def big_answers() -> None:  # 64 MiB of logits can never be sent: refused before any work
        async with serving(tiny_repo, max_feed_tokens=2_000_000) as (_app, ch, stub):
            sid = (await stub.OpenSession(open_req())).session_id
            n = 450_000  # 3.6 MB of ids; logits 450,000 x 40+ floats > 64 MiB
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(
                    tokens=pb.TokenIds(ids=[1] * n), output=pb.OUTPUT_ALL, logits=True)))
            assert e.value.code() == RE and "message limit" in e.value.details(), e.value.details()
            assert time.monotonic() - t0 < 5  # nothing was computed
            kpb = messages()
            req = kpb.ModelInferRequest(model_name="tiny")
            t = req.inputs.add(name="tokens", datatype="INT64", shape=[1, n])
            req.raw_input_contents.append(np.ones(n, "<i8").tobytes())
            assert t.name == "tokens"
            call = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                  request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=kpb.ModelInferResponse.FromString)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call(req)
            assert e.value.code() == RE and "message limit" in e.value.details(), e.value.details()
            assert (await stub.GetState(pb.GetStateRequest(session_id=sid))).steps == 0

    asyncio.run(big_answers())


# ----------------------------------------------------------------------------- non-finite outputs
def _graphs(graph):
    """A graph and every subgraph inside its nodes' attributes (Scan and Loop bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def poisoned_repo(tiny_repo: Path, tmp_path: Path, token: int) -> Path:
    """A copy of tiny/1 whose folded embedding row for `token` is NaN (checksums updated): stepping that
    token gives NaN logits and state; every other token is fine."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    d = repo / "tiny" / "1"
    meta = json.loads((d / "model.json").read_text())
    for fname in [f for f in ("model.onnx", "sequence.onnx", "generate.onnx") if f in meta["files"]]:
        m = onnx.load(str(d / fname))
        for graph in _graphs(m.graph):  # the generation graph keeps its weights inside its Loop's body
            for init in graph.initializer:
                arr = numpy_helper.to_array(init)
                if arr.ndim == 2 and arr.shape[0] == len(meta["vocab"]):  # the table gathered by token id
                    arr = arr.copy()
                    arr[token] = np.nan
                    init.CopyFrom(numpy_helper.from_array(arr, init.name))
        onnx.save(m, str(d / fname))
        meta["files"][fname] = sha256_file(d / fname)
    (d / "model.json").write_text(json.dumps(meta))
    return repo


def test_non_finite_rows_fail_alone_and_keep_their_state(tiny_repo: Path, tmp_path: Path, caplog) -> None:
    """A step that yields NaN is refused for that session only (FAILED_PRECONDITION naming the model),
    its state stays as before; the same batch's other rows answer normally; one log line; a metric."""
    repo = poisoned_repo(tiny_repo, tmp_path, token=3)

    async def main() -> None:
        async with serving(repo) as (app, _ch, stub):
            sids = [(await stub.OpenSession(open_req())).session_id for _ in range(4)]
            for sid in sids:
                await stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2]))))
            before = [(await stub.GetState(pb.GetStateRequest(session_id=s))) for s in sids]
            await asyncio.sleep(0.05)  # no other session stepping lately: a lone step runs at once, on the loop
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await stub.Step(pb.StepRequest(session_id=sids[1], feed=pb.Feed(tokens=pb.TokenIds(ids=[3]))))
                assert e.value.code() == FP and "tiny:1" in e.value.details() and "NaN" in e.value.details()
            alone = await stub.GetState(pb.GetStateRequest(session_id=sids[1]))
            assert alone.state == before[1].state and alone.steps == before[1].steps == 2
            for _ in range(3):  # one token each, in one batch: rows 1 and 3 step the poisoned token
                calls = [stub.Step(pb.StepRequest(session_id=s, feed=pb.Feed(
                    tokens=pb.TokenIds(ids=[3 if i % 2 else 5]), output=pb.OUTPUT_LAST, top_k=3)))
                         for i, s in enumerate(sids)]
                results = await asyncio.gather(*calls, return_exceptions=True)
                for i, r in enumerate(results):
                    if i % 2:
                        assert isinstance(r, grpc.aio.AioRpcError) and r.code() == FP, r
                        assert "tiny:1" in r.details() and "NaN" in r.details()
                    else:
                        assert not isinstance(r, Exception) and np.isfinite(r.result.distributions[0].top_probs).all()
            # a multi-token feed through the token fails whole: the state is as before the feed
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Step(pb.StepRequest(session_id=sids[1], feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 3, 1]))))
            assert e.value.code() == FP
            after = await stub.GetState(pb.GetStateRequest(session_id=sids[1]))
            assert after.state == before[1].state and after.steps == before[1].steps == 2
            # a generation that samples into the poisoned token ends with the error, its earlier text kept
            st = SessionStream(stub)
            await st.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
            await st.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[1])))
            for seed in range(50):
                r = await st.send(generate=pb.Generate(max_tokens=30, temperature=3.0, seed=seed, chunk_tokens=1))
                while r.WhichOneof("kind") == "chunk" and not r.chunk.done:
                    r = await st.call.read()
                if r.WhichOneof("kind") == "error":
                    assert r.error.code == FP.value[0] and "tiny:1" in r.error.message
                    break
            else:
                pytest.fail("no generation stepped token 3 in 50 tries")
            assert np.isfinite((await stub.GetState(pb.GetStateRequest(session_id=st.sid))).state).all()
            await st.end()
            assert app.metrics.registry.get_sample_value("rnnserve_nonfinite_rows_total",
                                                       {"model": "tiny", "version": "1"}) >= 8

    with caplog.at_level("ERROR", logger="rnnserve.server.batcher"):
        asyncio.run(main())
    assert len([r for r in caplog.records if "NaN or infinite" in r.getMessage()]) == 1


# ----------------------------------------------------------------------------- small ones
def test_tiny_temperatures_are_greedy(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo) as (_app, _ch, stub):
            outs = []
            for temperature in (0.0, 1e-40, 1e-300, 5e-324, 1e-7):
                st = SessionStream(stub)
                await st.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
                await st.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2, 3])))
                toks, _ = await st.generate(max_tokens=40, temperature=temperature, seed=1)
                outs.append(toks)
                await st.end()
            assert all(o == outs[0] for o in outs), outs

    asyncio.run(main())


def test_long_ids_and_names_are_refused_without_being_echoed(tiny_repo: Path) -> None:
    async def main() -> None:
        async with serving(tiny_repo) as (_app, _ch, stub):
            huge = "x" * 100_000
            for call, req in [(stub.GetState, pb.GetStateRequest(session_id=huge)),
                              (stub.CloseSession, pb.CloseSessionRequest(session_id=huge)),
                              (stub.Step, pb.StepRequest(session_id=huge, feed=pb.Feed(text="a")))]:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call(req)
                assert e.value.code() == IA and len(e.value.details()) < 300, e.value.details()[:300]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.OpenSession(open_req(huge))
            assert e.value.code() == NF and len(e.value.details()) < 400

    asyncio.run(main())


def test_resume_waits_for_a_feed_left_running_by_a_dropped_stream(tiny_repo: Path) -> None:
    """A stream drops mid-feed; resuming on a new stream waits for the feed and reports the true step count."""
    async def main() -> None:
        async with serving(tiny_repo, feed_slice_ms=0.1) as (_app, _ch, stub):
            st = SessionStream(stub)
            await st.send(open=pb.Open(model=pb.ModelRef(name="tiny")))
            await st.q.put(pb.SessionRequest(request_id=9, feed=pb.Feed(tokens=pb.TokenIds(ids=[1] * 20_000))))
            await asyncio.sleep(0.1)
            st.call.cancel()  # the client goes away while its feed runs
            again = SessionStream(stub)
            r = await again.send(resume=pb.Resume(session_id=st.sid))
            assert r.WhichOneof("kind") == "opened" and r.opened.steps == 20_000, r
            r = await again.send(feed=pb.Feed(tokens=pb.TokenIds(ids=[2])))
            assert r.fed.steps == 20_001
            await again.end()

    asyncio.run(main())


def test_undecodable_messages_are_invalid_argument_and_logged_once(tiny_repo: Path, caplog) -> None:
    """Garbage bytes on a unary call and after a valid request on a KServe stream: INVALID_ARGUMENT, the
    valid answer still delivered, the stream ended with a status, one log line for many bad calls."""
    kpb = messages()

    async def main() -> None:
        async with serving(tiny_repo) as (_app, ch, _stub):
            raw = ch.unary_unary("/rnnserve.v1.RnnServe/GetState")
            for _ in range(30):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await raw(b"\xff\xff\xff\xff", timeout=10)
                assert e.value.code() == IA, e.value
            good = kpb.ModelInferRequest(model_name="tiny", id="ok")
            good.inputs.add(name="tokens", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 2])
            stream = ch.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                      response_deserializer=kpb.ModelStreamInferResponse.FromString)

            async def requests():
                yield good.SerializeToString()
                yield b"\x0a\xff\xff\xff\x0f"
            call = stream(requests(), timeout=10)
            answers = [r async for r in _read_all(call)]
            assert await call.code() == IA, await call.details()
            assert [a.infer_response.id for a in answers] == ["ok"] and not answers[0].error_message

    with caplog.at_level("WARNING", logger="rnnserve.server.interceptors"):
        asyncio.run(main())
    lines = [r for r in caplog.records if "undecodable" in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]


async def _read_all(call):
    try:
        async for r in call:
            yield r
    except grpc.aio.AioRpcError:
        return


@pytest.mark.timeout(120)
def test_grace_is_a_deadline_even_during_a_long_feed(tmp_path: Path) -> None:
    """SIGTERM while a 200,000-token feed runs on the shipped model (about 20 s of work): the process exits 0
    within --grace plus the margin, and the feed's client gets UNAVAILABLE (not a hang)."""
    port_file, log = tmp_path / "port.json", tmp_path / "server.log"
    exe = Path(sys.executable).with_name("rnn-serve")
    with log.open("wb") as out:
        proc = subprocess.Popen([str(exe), "--models", str(SHIPPED), "--host", "127.0.0.1", "--port", "0",
                                 "--metrics-port", "-1", "--poll-interval", "0", "--grace", "1",
                                 "--feed-slice-ms", "50", "--state-dir", str(tmp_path / "state"),
                                 "--port-file", str(port_file)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        port = json.loads(port_file.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
            stub = pb_grpc.RnnServeStub(ch)
            sid = stub.OpenSession(open_req("shakespeare")).session_id
            fut = stub.Step.future(pb.StepRequest(session_id=sid, feed=pb.Feed(
                tokens=pb.TokenIds(ids=[1] * 200_000), output=pb.OUTPUT_NONE)), timeout=60)
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
            took = time.monotonic() - t0
            assert rc == 0, log.read_text()
            assert took < 1 + 1.0 + 0.5, (took, log.read_text())  # grace + EXIT_MARGIN_S + scheduling slack
            with pytest.raises(grpc.RpcError) as e:
                fut.result(timeout=10)
            assert e.value.code() in (UN, grpc.StatusCode.CANCELLED), e.value
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

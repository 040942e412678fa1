"""Principals: bearer tokens from a file (reloaded), JWTs against a JWKS, sessions bound to their owner on
every RPC of both protocols with no oracle, KServe sequence ids per principal, quotas, safe defaults."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import grpc
import jwt
import numpy as np
import rnnserve.v1.rnnserve_pb2 as pb
from conftest import started
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.server.app import App, is_loopback
from rnnserve.server.auth import REFUSED, digest
from rnnserve.server.kserve import messages
from rnnserve.server.settings import Settings, parse

NF, UN, RE = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED
K = messages()


def tokens_file(path: Path, entries: dict[str, dict]) -> Path:
    """{token: {"principal": ..., limits...}} -> the JSON the server reads (digests only)."""
    path.write_text(json.dumps({"tokens": [{"sha256": digest(tok), **e} for tok, e in entries.items()]}))
    return path


def serving(repo: Path, **kw):
    s = dataclasses.replace(Settings(models=repo, host="127.0.0.1", port=0, metrics_port=-1, poll_interval=0,
                                     session_store="memory"), **kw)
    return started(App(s))


def md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def open_req(model: str = "tiny") -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=model)))


async def code_and_details(coro) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_a_session_is_invisible_to_other_principals_on_every_rpc(tiny_repo: Path, tmp_path: Path) -> None:
    """Bob gets for Alice's session exactly what he gets for an id that never existed, on every RPC of
    both protocols, before and after Alice closes it; Alice's own calls work."""
    tf = tokens_file(tmp_path / "tokens.json", {"A-secret": {"principal": "alice"}, "B-secret": {"principal": "bob"}})

    async def main() -> None:
        async with serving(tiny_repo, auth_tokens=tf) as (_app, _ch, stub):
            a, b = md("A-secret"), md("B-secret")
            sid = (await stub.OpenSession(open_req(), metadata=a)).session_id
            await stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2]))), metadata=a)
            never = "x" * len(sid)

            def calls(target: str):
                return [stub.GetState(pb.GetStateRequest(session_id=target), metadata=b),
                        stub.SetState(pb.SetStateRequest(session_id=target, state=[0.0] * 32), metadata=b),
                        stub.Step(pb.StepRequest(session_id=target, feed=pb.Feed(text="a")), metadata=b),
                        stub.CloseSession(pb.CloseSessionRequest(session_id=target), metadata=b)]

            async def stream_answer(target: str) -> tuple[int, str]:
                call = stub.Session(metadata=b)
                await call.write(pb.SessionRequest(request_id=1, resume=pb.Resume(session_id=target)))
                r = await call.read()
                await call.done_writing()
                return r.error.code, r.error.message

            for phase in ("live", "closed"):
                for mine, other in zip(calls(sid), calls(never)):
                    got, want = await code_and_details(mine), await code_and_details(other)
                    assert got[0] == want[0] == NF, (phase, got, want)
                    assert got[1].replace(sid, never) == want[1], (phase, got, want)
                got, want = await stream_answer(sid), await stream_answer(never)
                assert got[0] == want[0] == NF.value[0] and got[1].replace(sid, never) == want[1], (phase, got, want)
                if phase == "live":
                    assert (await stub.GetState(pb.GetStateRequest(session_id=sid), metadata=a)).steps == 2
                    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=a)
            code, text = await code_and_details(stub.GetState(pb.GetStateRequest(session_id=sid), metadata=a))
            assert code == NF and "was closed" in text  # the owner is told what happened

    asyncio.run(main())


def test_two_principals_using_the_same_kserve_sequence_id_get_two_sequences(tiny_repo: Path, tmp_path: Path) -> None:
    """Alice and Bob both use sequence_id 1, interleaved on their own streams: each equals an isolated run;
    Bob continuing (no start) a sequence id only Alice started is NOT_FOUND like a never-started one."""
    tf = tokens_file(tmp_path / "tokens.json", {"A": {"principal": "alice"}, "B": {"principal": "bob"}})

    def request(toks: list[int], seq, start: bool = False):
        r = K.ModelInferRequest(model_name="tiny")
        r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(toks)]).contents.int64_contents.extend(toks)
        r.parameters["sequence_id"].int64_param = seq
        r.parameters["sequence_start"].bool_param = start
        return r

    async def main() -> None:
        async with serving(tiny_repo, auth_tokens=tf) as (_app, ch, _stub):
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=K.ModelInferRequest.SerializeToString,
                                   response_deserializer=K.ModelInferResponse.FromString)

            async def run(token: str, toks: list[list[int]], seq: int) -> list[np.ndarray]:
                out = []
                for i, t in enumerate(toks):
                    r = await infer(request(t, seq, start=i == 0), metadata=md(token))
                    out.append(np.frombuffer(r.raw_output_contents[0], "<f4"))
                return out

            alice, bob = [[1, 2], [3], [4, 5]], [[6], [7, 8], [9]]
            want_a, want_b = await run("A", alice, 11), await run("B", bob, 12)  # alone, on ids of their own
            got_a, got_b = [], []
            for i in range(3):  # interleaved, both on sequence id 1
                got_a += await run("A", [alice[i]], 1) if i == 0 else [np.frombuffer(
                    (await infer(request(alice[i], 1), metadata=md("A"))).raw_output_contents[0], "<f4")]
                got_b += await run("B", [bob[i]], 1) if i == 0 else [np.frombuffer(
                    (await infer(request(bob[i], 1), metadata=md("B"))).raw_output_contents[0], "<f4")]
            for g, w in zip(got_a + got_b, want_a + want_b):
                np.testing.assert_array_equal(g, w)
            await infer(request([1], 77, start=True), metadata=md("A"))
            got = await code_and_details(infer(request([1], 77), metadata=md("B")))
            never = await code_and_details(infer(request([1], 78), metadata=md("B")))
            assert got[0] == never[0] == NF and got[1].replace("77", "78") == never[1], (got, never)

    asyncio.run(main())


def test_tokens_file_is_reloaded_and_refusals_say_nothing(tiny_repo: Path, tmp_path: Path) -> None:
    tf = tokens_file(tmp_path / "tokens.json", {"old-token": {"principal": "alice"}})

    async def main() -> None:
        async with serving(tiny_repo, auth_tokens=tf) as (_app, ch, stub):
            await stub.ListModels(pb.ListModelsRequest(), metadata=md("old-token"))
            for bad in ((), md("nope"), (("authorization", "Basic xyz"),), (("authorization", "Bearer"),)):
                assert await code_and_details(stub.ListModels(pb.ListModelsRequest(), metadata=bad)) == (UN, REFUSED)
            health = health_pb2_grpc.HealthStub(ch)  # open without credentials
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
            live = ch.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                  request_serializer=K.ServerLiveRequest.SerializeToString,
                                  response_deserializer=K.ServerLiveResponse.FromString)
            assert (await code_and_details(live(K.ServerLiveRequest())))[0] == UN
            await asyncio.sleep(0.01)
            tokens_file(tf, {"new-token": {"principal": "alice"}})
            os.utime(tf, ns=(time.time_ns(), time.time_ns() + 1_000_000))
            await stub.ListModels(pb.ListModelsRequest(), metadata=md("new-token"))
            assert (await code_and_details(stub.ListModels(pb.ListModelsRequest(), metadata=md("old-token"))))[0] == UN

    asyncio.run(main())


def test_jwts_are_verified_against_the_jwks(tiny_repo: Path, tmp_path: Path) -> None:
    """Good token: its `sub` is the principal. Expired, wrong audience, wrong issuer, signed by another key,
    alg none, garbage: all UNAUTHENTICATED with the same words."""
    key, other = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2))
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    now = int(time.time())

    def token(signer=key, **claims) -> str:
        body = {"sub": "carol", "iss": "https://issuer.test", "aud": "rnnserve", "exp": now + 300, **claims}
        return jwt.encode(body, signer, algorithm="RS256", headers={"kid": "k1"})

    async def main() -> None:
        async with serving(tiny_repo, auth_jwks=tmp_path / "jwks.json", auth_issuer="https://issuer.test",
                           auth_audience="rnnserve") as (_app, _ch, stub):
            sid = (await stub.OpenSession(open_req(), metadata=md(token()))).session_id
            await stub.GetState(pb.GetStateRequest(session_id=sid), metadata=md(token()))
            bad = [token(exp=now - 10), token(aud="someone-else"), token(iss="https://evil.test"),
                   token(signer=other), jwt.encode({"sub": "carol", "exp": now + 300}, None, algorithm="none"),
                   token()[:-4] + "AAAA", "not.a.jwt"]
            for t in bad:
                assert await code_and_details(stub.GetState(pb.GetStateRequest(session_id=sid), metadata=md(t))) == \
                    (UN, REFUSED), t
            code, _ = await code_and_details(stub.GetState(pb.GetStateRequest(session_id=sid),
                                                           metadata=md(token(sub="dave"))))
            assert code == NF  # another principal: not Carol's session

    asyncio.run(main())


def test_quotas_per_principal(tiny_repo: Path, tmp_path: Path) -> None:
    """Sessions, tokens per second and generations at once, each RESOURCE_EXHAUSTED naming its limit; a
    stateless KServe request does not count against the session cap."""
    tf = tokens_file(tmp_path / "tokens.json", {
        "A": {"principal": "alice", "sessions": 2, "generations": 1},
        "B": {"principal": "bob", "tokens_per_s": 200}})

    async def main() -> None:
        async with serving(tiny_repo, auth_tokens=tf, max_sessions=2) as (_app, ch, stub):
            a, b = md("A"), md("B")
            s1 = (await stub.OpenSession(open_req(), metadata=a)).session_id
            s2 = (await stub.OpenSession(open_req(), metadata=a)).session_id
            code, text = await code_and_details(stub.OpenSession(open_req(), metadata=a))
            assert code == RE and "alice" in text and "2 live sessions" in text, text
            req = K.ModelInferRequest(model_name="tiny")  # stateless: not a session, fine at the cap
            req.inputs.add(name="tokens", datatype="INT64", shape=[1, 2]).contents.int64_contents.extend([1, 2])
            infer = ch.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=K.ModelInferRequest.SerializeToString,
                                   response_deserializer=K.ModelInferResponse.FromString)
            await infer(req, metadata=a)
            for sid in (s1, s2):
                await stub.Step(pb.StepRequest(session_id=sid, feed=pb.Feed(tokens=pb.TokenIds(ids=[1]))), metadata=a)
            calls = []
            for sid in (s1, s2):
                call = stub.Session(metadata=a)
                await call.write(pb.SessionRequest(request_id=1, resume=pb.Resume(session_id=sid)))
                await call.read()
                await call.write(pb.SessionRequest(request_id=2, generate=pb.Generate(max_tokens=4000, chunk_tokens=1)))
                calls.append(call)
            answers = [await c.read() for c in calls]
            assert answers[0].WhichOneof("kind") == "chunk", answers[0]
            assert answers[1].error.code == RE.value[0] and "generations" in answers[1].error.message, answers[1]
            for c in calls:
                c.cancel()
            await stub.CloseSession(pb.CloseSessionRequest(session_id=s1), metadata=a)  # room under --max-sessions
            sb = (await stub.OpenSession(open_req(), metadata=b)).session_id
            await stub.Step(pb.StepRequest(session_id=sb, feed=pb.Feed(tokens=pb.TokenIds(ids=[1] * 300))), metadata=b)
            code, text = await code_and_details(
                stub.Step(pb.StepRequest(session_id=sb, feed=pb.Feed(tokens=pb.TokenIds(ids=[1]))), metadata=b))
            assert code == RE and "bob" in text and "tokens per second" in text, text
            await asyncio.sleep(0.6)  # the bucket refills at 200/s: the debt of 100 is paid
            await stub.Step(pb.StepRequest(session_id=sb, feed=pb.Feed(tokens=pb.TokenIds(ids=[1]))), metadata=b)

    asyncio.run(main())


def test_safe_defaults(tiny_repo: Path, caplog) -> None:
    """Loopback unless told; a non-loopback address with no authentication logs one clear warning."""
    assert parse([], {}).host == "127.0.0.1" == Settings().host
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.com")

    async def main() -> None:
        async with serving(tiny_repo, host="0.0.0.0"):
            pass

    with caplog.at_level(logging.WARNING, logger="rnnserve.server.app"):
        asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if "no authentication" in r.getMessage()]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0], warnings




def test_metrics_endpoint_only_serves_metrics_and_can_require_credentials(tiny_repo: Path, tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    tf = tokens_file(tmp_path / "tokens.json", {"ops-token": {"principal": "ops"}})

    def get(port: int, path: str, token: str | None = None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    async def main() -> None:
        async with serving(tiny_repo, auth_tokens=tf, metrics_port=0, metrics_auth=True) as (app, _ch, _stub):
            port = app.metrics_port
            codes = await asyncio.gather(*[asyncio.to_thread(get, port, p, t) for p, t in [
                ("/metrics", None), ("/metrics", "wrong"), ("/metrics", "ops-token"), ("/", "ops-token")]])
            assert codes == [401, 401, 200, 404], codes

    asyncio.run(main())

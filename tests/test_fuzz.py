"""Fuzz and abuse of a real rnn-serve: random bytes and mutated valid messages at every method of both protocols.

Every call must end with a final status (no hang) other than UNKNOWN or INTERNAL (in-stream errors too), and
after the campaign the server must be alive, answer normal requests exactly as before, and have kept its
memory and its log in bounds. Bounded by default (15-30 s); RNNSERVE_FUZZ=long (`make fuzz`) runs for
minutes with fresh random seeds. Failures name the method, the input and the status seen.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
from _fuzz_support import Method, Server, all_methods, check, in_stream_error, invoke, show, start_server
from google.protobuf.descriptor import FieldDescriptor as FD
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from rnnserve.server.kserve.descriptors import SERVICE, messages

LONG = os.environ.get("RNNSERVE_FUZZ", "") == "long"
# No shrinking: a hang costs a full call deadline per try. Failures print the input; `print_blob` lets a long
# run's failure be replayed with @reproduce_failure. The default profile is derandomized: the same inputs in CI.
settings.register_profile("fuzz", deadline=None, database=None, derandomize=True, print_blob=True,
                          max_examples=30, phases=(Phase.explicit, Phase.generate),
                          suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.large_base_example, HealthCheck.filter_too_much))
settings.register_profile("fuzz-long", settings.get_profile("fuzz"), derandomize=False, max_examples=2000)
PROFILE = settings.get_profile("fuzz-long" if LONG else "fuzz")
RSS_GROWTH_MB = 150.0  # the server's RSS after the campaign over its RSS after warm-up
LOG_GROWTH_BYTES = 1_000_000 if LONG else 200_000  # no traceback (or line) per request
pytestmark = pytest.mark.timeout(3600 if LONG else 300)

K = messages()
METHODS = all_methods()
BY_NAME = {m.name: m for m in METHODS}
MODELS = ("tiny", "tiny-lstm", "tiny-gru")
USES_SESSION = {"Session", "Step", "GetState", "SetState", "CloseSession", "ForkSession"}
# What must answer OK to a valid request: every native method, the KServe ones rnnserve serves.
MUST_SERVE = {m.name for m in METHODS if m.path.startswith("/rnnserve.")} | {
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig", "ModelInfer",
    "ModelStreamInfer", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad"}
# the fuzz server polls its repository (--model-control poll): there, Unload is refused by design
EXPECTED = {"RepositoryModelUnload": {grpc.StatusCode.FAILED_PRECONDITION}}
Draw = Callable[[st.SearchStrategy], Any]


class Long(str):
    """A huge string that prints short in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"{self[:1]!r}*{len(self)}"


BIG = Long("x" * 100_000)
STRINGS = st.one_of(st.sampled_from(["", "²", "١٢", "0", "1", "-1", "01", " 1", "1.0", "99999999999999999999",
                                     "tiny", "tiny-lstm", "nope", "tokens", "state", "logits", "sequence_id",
                                     "sequence_start", "sequence_end", "INT64", "FP32", "\x00", "🐍", BIG]),
                    st.text(max_size=24))
FLOATS32 = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), 3.4e38, -1.0, 0.0, 1.0, 1e-45]),
                     st.floats(width=32, allow_subnormal=False))


def ints(bits: int, signed: bool) -> st.SearchStrategy[int]:
    """Integers of a proto field's width, biased to the edges."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    edges = [v for v in (0, 1, 2, 3, 44, 45, 46, 4096, 4097, -1, lo, hi, 2 ** 31, 2 ** 32) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


def scalar(f: FD) -> st.SearchStrategy[Any]:
    """Hostile values for one scalar field (any enum number, NaN/inf floats, huge and unicode strings)."""
    t = f.cpp_type
    if t == FD.CPPTYPE_STRING:
        return st.binary(max_size=64) if f.type == FD.TYPE_BYTES else STRINGS
    if t == FD.CPPTYPE_BOOL:
        return st.booleans()
    if t == FD.CPPTYPE_FLOAT:
        return FLOATS32
    if t == FD.CPPTYPE_DOUBLE:
        return st.one_of(FLOATS32, st.floats(allow_subnormal=False))
    if t == FD.CPPTYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), ints(32, True))
    bits = 32 if t in (FD.CPPTYPE_INT32, FD.CPPTYPE_UINT32) else 64
    return ints(bits, t in (FD.CPPTYPE_INT32, FD.CPPTYPE_INT64))


def mutate(draw: Draw, msg: Message, depth: int = 0) -> None:
    """Set one field somewhere in msg (up to 3 levels down) to a hostile value."""
    fields = list(msg.DESCRIPTOR.fields)
    if not fields:
        return
    present = [f for f, _ in msg.ListFields()]  # mostly one already set: keeps the request's shape
    f = draw(st.sampled_from(present if present and draw(st.integers(0, 3)) else fields))
    value = getattr(msg, f.name)
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
        key = draw(scalar(kf))
        if vf.message_type is not None:
            mutate(draw, value[key], depth + 1)
        else:
            value[key] = draw(scalar(vf))
    elif f.message_type is not None:
        if f.is_repeated:
            value = value[draw(st.integers(0, len(value) - 1))] if value and draw(st.booleans()) else value.add()
        if depth < 3 and draw(st.integers(0, 3)):
            mutate(draw, value, depth + 1)
        else:
            value.SetInParent()
    elif f.is_repeated:
        action = draw(st.sampled_from(["append", "clear", "replace"]))
        if action == "clear" or (action == "replace" and value):
            del value[:]
        if action != "clear":
            value.extend(draw(st.lists(scalar(f), min_size=1, max_size=draw(st.sampled_from([3, 70])))))
    else:
        setattr(msg, f.name, draw(scalar(f)))


def corrupt(draw: Draw, raw: bytes) -> bytes:
    """Mostly the bytes as they are; else one byte flipped, cut short, or with garbage appended."""
    op = draw(st.sampled_from(["keep"] * 6 + ["flip", "cut", "append"]))
    if op == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if op == "cut" and raw:
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if op == "append":
        return raw + draw(st.binary(min_size=1, max_size=16))
    return raw


# ----------------------------------------------------------------------------- valid requests to start from
def infer_request(model: str, tokens: list[int], seq: int | str | None = None, start: bool = False,
                  end: bool = False, raw: bool = False, outputs: tuple[str, ...] = ()) -> Message:
    """A valid KServe ModelInferRequest: INT64 `tokens` [1, T], Triton's sequence parameters when seq is set."""
    r = K.ModelInferRequest(model_name=model, id="fuzz")
    t = r.inputs.add(name="tokens", datatype="INT64", shape=[1, len(tokens)])
    if raw:
        r.raw_input_contents.append(np.asarray(tokens, "<i8").tobytes())
    else:
        t.contents.int64_contents.extend(tokens)
    if seq is not None:
        if isinstance(seq, str):
            r.parameters["sequence_id"].string_param = seq
        else:
            r.parameters["sequence_id"].int64_param = seq
        r.parameters["sequence_start"].bool_param = start
        r.parameters["sequence_end"].bool_param = end
    for name in outputs:
        r.outputs.add(name=name)
    return r


def session_requests(model: str, sid: str, resume: bool) -> list[Message]:
    """A valid native Session conversation: open (or resume sid), feed, generate, reset, feed, close."""
    first = pb.SessionRequest(resume=pb.Resume(session_id=sid)) if resume else \
        pb.SessionRequest(open=pb.Open(model=pb.ModelRef(name=model), initial=pb.INITIAL_STATE_ZEROS))
    rest = [pb.SessionRequest(feed=pb.Feed(text="First Citizen", output=pb.OUTPUT_LAST, top_k=3)),
            pb.SessionRequest(generate=pb.Generate(max_tokens=8, temperature=0.8, top_k=5, top_p=0.9, seed=1,
                                                   stop=["\n"], chunk_tokens=3)),
            pb.SessionRequest(reset=pb.Reset(initial=pb.INITIAL_STATE_MODEL)),
            pb.SessionRequest(feed=pb.Feed(tokens=pb.TokenIds(ids=[1, 2, 3]), output=pb.OUTPUT_ALL, logits=True)),
            pb.SessionRequest(close=pb.Close())]
    for i, r in enumerate([first, *rest]):
        r.request_id = i + 1
    return [first, *rest]


def seed_requests(method: Method, draw: Draw, fz: Fuzz, sid: str) -> list[Message]:
    """Valid request(s) for method on a drawn model (sid: a live session of that model, for those that use one)."""
    model = fz.model_of.get(sid) or draw(st.sampled_from(MODELS))
    size = fz.state_sizes[model]
    seq = draw(st.one_of(st.integers(1, 2 ** 63 - 1), st.text("abcdef", min_size=1, max_size=8)))
    tokens = draw(st.lists(st.integers(0, 44), min_size=1, max_size=6))
    simple: dict[str, Callable[[], list[Message]]] = {
        "Session": lambda: session_requests(model, sid, draw(st.booleans())),
        "OpenSession": lambda: [pb.OpenSessionRequest(open=pb.Open(
            model=pb.ModelRef(name=model, version=1), initial=pb.INITIAL_STATE_GIVEN, state=[0.25] * size))],
        "Step": lambda: [pb.StepRequest(session_id=sid, feed=pb.Feed(text="Speak", output=pb.OUTPUT_LAST, top_k=2))],
        "GetState": lambda: [pb.GetStateRequest(session_id=sid)],
        "SetState": lambda: [pb.SetStateRequest(session_id=sid, state=[0.5] * size)],
        "CloseSession": lambda: [pb.CloseSessionRequest(session_id=sid)],
        "ForkSession": lambda: [pb.ForkSessionRequest(session_id=sid)],
        "ModelInfer": lambda: [infer_request(model, tokens, draw(st.sampled_from([None, seq])), start=True,
                                             end=True, raw=draw(st.booleans()), outputs=("logits", "state"))],
        "ModelStreamInfer": lambda: [infer_request(model, tokens, seq, start=True),
                                     infer_request(model, tokens, seq, raw=True, outputs=("state",)),
                                     infer_request(model, tokens, seq, end=True),
                                     infer_request(model, tokens)],
    }
    if method.name in simple:
        return simple[method.name]()
    msg = method.request()
    for name in ("name", "model_name"):
        if name in msg.DESCRIPTOR.fields_by_name:
            setattr(msg, name, model)
    if "version" in msg.DESCRIPTOR.fields_by_name:
        msg.version = "1"
    return [msg]


# ----------------------------------------------------------------------------- the server under test
class Fuzz:
    """The server of this module, a channel to it, and what it answered to normal requests after warm-up."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(server.target, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = pb_grpc.RnnServeStub(self.channel)
        models = self.stub.ListModels(pb.ListModelsRequest(), timeout=30).models
        self.state_sizes = {m.name: m.state_size for m in models}
        self.model_of: dict[str, str] = {}  # live session id -> model
        self.reference: tuple = ()
        self.rss_mb, self.log_bytes = 0.0, 0

    def __repr__(self) -> str:
        return f"<rnn-serve pid {self.server.proc.pid} at {self.server.target}>"

    @contextmanager
    def session(self, method: Method, draw: Draw) -> Iterator[str]:
        """A fresh live session (of a drawn model) for methods that take one; closed afterwards."""
        if method.name not in USES_SESSION:
            yield ""
            return
        model = draw(st.sampled_from(MODELS))
        sid = self.stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=model))),
                                    timeout=10).session_id
        self.model_of[sid] = model
        try:
            yield sid
        finally:
            del self.model_of[sid]
            try:
                self.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=10)
            except grpc.RpcError:
                pass  # closed by the example itself


def normal_answers(fz: Fuzz) -> tuple:
    """What a healthy server answers: a greedy native generation, KServe logits and state, the model list."""
    resps = list(fz.stub.Session(iter([
        pb.SessionRequest(request_id=1, open=pb.Open(model=pb.ModelRef(name="tiny"))),
        pb.SessionRequest(request_id=2, feed=pb.Feed(text="First Citizen:\n")),
        pb.SessionRequest(request_id=3, generate=pb.Generate(max_tokens=24, temperature=0.0)),
        pb.SessionRequest(request_id=4, close=pb.Close())]), timeout=10))
    assert [r.WhichOneof("kind") for r in resps][-1] == "closed", resps
    tokens = tuple(t for r in resps if r.WhichOneof("kind") == "chunk" for t in r.chunk.tokens)
    infer = fz.channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=K.ModelInferRequest.SerializeToString,
                                   response_deserializer=K.ModelInferResponse.FromString)
    outs = []
    for model in MODELS:
        r = infer(infer_request(model, [3, 1, 4, 1, 5], seq="ref", start=True, end=True,
                                outputs=("logits", "state")), timeout=10)
        outs.append(np.concatenate([np.frombuffer(b, "<f4") for b in r.raw_output_contents]))
    listed = tuple(sorted((m.name, m.version) for m in fz.stub.ListModels(pb.ListModelsRequest(), timeout=10).models))
    return tokens, outs, listed


@pytest.fixture(scope="module")
def fuzz(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzz]:
    """One rnn-serve for the module (on a copy of tiny_repo), warmed up, with its RSS and log size then."""
    server = start_server(tiny_repo, tmp_path_factory.mktemp("fuzz"), "--log-level", "INFO")
    try:
        fz = Fuzz(server)
        for _ in range(3):  # warm-up: every model, both protocols, generation
            fz.reference = normal_answers(fz)
        fz.rss_mb, fz.log_bytes = server.rss_mb(), server.log_bytes()
        yield fz
        fz.channel.close()
    finally:
        server.stop()


# ----------------------------------------------------------------------------- the campaign
IDS = [str(m) for m in METHODS]


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@settings(PROFILE, max_examples=3)
@given(data=st.data())
def test_seeds_are_valid(fuzz: Fuzz, method: Method, data: st.DataObject) -> None:
    """The unmutated requests the mutation campaign starts from succeed (so mutations reach the server's logic)."""
    with fuzz.session(method, data.draw) as sid:
        payloads = [m.SerializeToString() for m in seed_requests(method, data.draw, fuzz, sid)]
        out = check(fuzz.server, fuzz.channel, method, payloads)
    ok = EXPECTED.get(method.name) or (
        {grpc.StatusCode.OK} if method.name in MUST_SERVE else {grpc.StatusCode.OK, grpc.StatusCode.UNIMPLEMENTED})
    errors = [in_stream_error(method.response.FromString(r)) for r in out.responses]
    assert out.code in ok and not any(code for code, _ in errors), (
        f"{method}: a valid request got {out.code.name} {out.details!r}, in-stream errors {errors}\n"
        f"{show(method, payloads)}")


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@settings(PROFILE)
@example(payloads=[b"\xff\xff\xff"])  # undecodable: a truncated varint
@given(payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_random_bytes(fuzz: Fuzz, method: Method, payloads: list[bytes]) -> None:
    """Random bytes as the request(s) of every method, on a raw channel."""
    check(fuzz.server, fuzz.channel, method, payloads if method.client_streaming else payloads[:1])


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@settings(PROFILE, max_examples=PROFILE.max_examples * 3)
@given(data=st.data())
def test_mutated_messages(fuzz: Fuzz, method: Method, data: st.DataObject) -> None:
    """Valid requests with 0-3 fields set to hostile values, then maybe a byte flipped, cut or appended."""
    draw: Draw = data.draw
    with fuzz.session(method, draw) as sid:
        msgs = seed_requests(method, draw, fuzz, sid)
        for _ in range(draw(st.integers(0, 3))):
            mutate(draw, msgs[draw(st.integers(0, len(msgs) - 1))])
        payloads = [corrupt(draw, m.SerializeToString()) for m in msgs]
        if method.client_streaming:
            payloads = payloads[:draw(st.integers(1, len(payloads)))]
            if draw(st.booleans()):  # valid, then garbage on the same stream
                payloads.append(draw(st.binary(min_size=1, max_size=32)))
        check(fuzz.server, fuzz.channel, method, payloads, paced=method.client_streaming and draw(st.booleans()))


def _case(method: str, *msgs: Message | bytes, paced: bool = False, repeat: int = 1) -> Abuse:
    """An Abuse of method with these requests (messages serialized, bytes as they are)."""
    return Abuse(BY_NAME[method], [m if isinstance(m, bytes) else m.SerializeToString() for m in msgs], paced, repeat)


class Abuse(NamedTuple):
    """A fixed hostile call: repeated (each call after the last ended) to catch a race with some likelihood."""

    method: Method
    payloads: list[bytes]
    paced: bool
    repeat: int


ABUSE = {  # known abuse, checked every run whatever the fuzzer draws
    "metadata-version-superscript-two": _case("ModelMetadata", K.ModelMetadataRequest(name="tiny", version="²")),
    "ready-version-superscript-two": _case("ModelReady", K.ModelReadyRequest(name="tiny", version="²")),
    "config-version-superscript-two": _case("ModelConfig", K.ModelConfigRequest(name="tiny", version="²")),
    "infer-version-superscript-two": _case("ModelInfer", K.ModelInferRequest(
        model_name="tiny", model_version="²", inputs=[infer_request("tiny", [1]).inputs[0]])),
    "stream-version-superscript-two": _case("ModelStreamInfer", K.ModelInferRequest(
        model_name="tiny", model_version="²", inputs=[infer_request("tiny", [1]).inputs[0]])),
    "getstate-100k-session-id": _case("GetState", pb.GetStateRequest(session_id=BIG)),
    "step-100k-session-id": _case("Step", pb.StepRequest(session_id=BIG, feed=pb.Feed(text="a"))),
    "open-100k-model-name": _case("OpenSession", pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=BIG)))),
    "metadata-100k-model-name": _case("ModelMetadata", K.ModelMetadataRequest(name=BIG)),
    "metadata-100k-version": _case("ModelMetadata", K.ModelMetadataRequest(name="tiny", version=BIG)),
    "infer-100k-model-name": _case("ModelInfer", infer_request(BIG, [1])),
    "infer-100k-sequence-id": _case("ModelInfer", infer_request("tiny", [1], seq=BIG)),
    "session-resume-100k-id": _case("Session", pb.SessionRequest(resume=pb.Resume(session_id=BIG))),
    "session-open-then-garbage": _case("Session", *session_requests("tiny", "", False)[:2], b"\xff\xff\xff",
                                       paced=True),
    # garbage once the answer is back: the server's error status can race its answer's write and never go out
    "stream-start-then-garbage": _case("ModelStreamInfer", infer_request("tiny", [1, 2], seq=991, start=True),
                                       b"\xff\xff\xff", paced=True, repeat=40),
    "stream-start-then-garbage-at-once": _case("ModelStreamInfer", infer_request("tiny", [1], seq=992, start=True),
                                               b"\xff\xff\xff"),
    "session-empty-stream": _case("Session"),
    "stream-empty-stream": _case("ModelStreamInfer"),
}


@pytest.mark.parametrize("case", ABUSE, ids=list(ABUSE))
def test_known_abuse(fuzz: Fuzz, case: str) -> None:
    """Fixed hostile inputs (unicode digits, 100,000-char ids and names, garbage after valid stream requests)."""
    method, payloads, paced, repeat = ABUSE[case]
    for _ in range(repeat):
        check(fuzz.server, fuzz.channel, method, payloads, paced)


def test_server_healthy_after_campaign(fuzz: Fuzz) -> None:
    """Last: the server is alive, answers as before the campaign, and kept its memory and log in bounds."""
    server = fuzz.server
    assert server.alive(), f"rnn-serve exited with {server.proc.returncode}:\n{server.log_tail()}"
    live = invoke(fuzz.channel, BY_NAME["ServerReady"], [b""])
    assert live.code == grpc.StatusCode.OK and K.ServerReadyResponse.FromString(live.responses[0]).ready, live
    tokens, outs, listed = normal_answers(fuzz)
    ref_tokens, ref_outs, ref_listed = fuzz.reference
    assert (tokens, listed) == (ref_tokens, ref_listed), "a normal request answers differently after the campaign"
    for model, got, want in zip(MODELS, outs, ref_outs):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"KServe logits/state of {model}")
    grown = server.rss_mb() - fuzz.rss_mb
    assert grown <= RSS_GROWTH_MB, f"server RSS grew by {grown:.0f} MB over the campaign (bound {RSS_GROWTH_MB} MB)"
    logged = server.log_bytes() - fuzz.log_bytes
    if logged > LOG_GROWTH_BYTES:
        with server.log.open("rb") as f:
            f.seek(fuzz.log_bytes)
            lines = f.read().decode(errors="replace").splitlines()
        stamp = re.compile(r"^\d{4}-\d\d-\d\d [\d:,.]+ ")  # log records start with one; traceback lines do not
        records = [stamp.sub("", ln) for ln in lines if stamp.match(ln)] or lines
        top = Counter(r[:160] for r in records).most_common(8)
        pytest.fail(f"the server log grew by {logged} bytes over the campaign (bound {LOG_GROWTH_BYTES}); "
                    "its most frequent records:\n" + "\n".join(f"{n:6d}x {t}" for t, n in top))

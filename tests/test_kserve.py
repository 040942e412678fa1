"""The Open Inference Protocol endpoint, driven by the real tritonclient against a real server."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as npb
import rnnserve.v1.rnnserve_pb2_grpc as npb_grpc
import tritonclient.grpc as tc
from conftest import Reference
from google.protobuf import descriptor_pool
from rnnserve.server.app import App
from rnnserve.server.kserve import descriptors as kserve_proto
from rnnserve.server.settings import Settings
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: F401  (registers Triton's own)
from tritonclient.utils import InferenceServerException


# ----------------------------------------------------------------------------- protocol files
def test_descriptor_set_is_fresh() -> None:
    """The committed grpc_service.desc is what protoc makes of the committed .proto files."""
    protogen = _protogen()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = protogen.generate_descriptors(Path(tmp) / "grpc_service.desc").read_bytes()
    assert fresh == protogen.DESC_PATH.read_bytes() == kserve_proto.descriptor_set(), (
        "server/kserve/grpc_service.desc is stale: run `make protos`")


def _protogen():
    import importlib.util

    spec = importlib.util.spec_from_file_location("protogen", Path(__file__).resolve().parent.parent / "scripts"
                                                  / "protogen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _same_enum(ours, theirs) -> None:
    for v in ours.values:
        assert theirs.values_by_name[v.name].number == v.number, (ours.full_name, v.name)


def _same_message(ours, theirs) -> None:
    for f in ours.fields:
        assert f.name in theirs.fields_by_name, (ours.full_name, f.name)
        t = theirs.fields_by_name[f.name]
        assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), (ours.full_name, f.name)
        if f.message_type is not None:
            assert f.message_type.full_name == t.message_type.full_name
        if f.enum_type is not None:
            assert f.enum_type.full_name == t.enum_type.full_name
    for o in ours.oneofs:
        assert {f.name for f in o.fields} <= {f.name for f in theirs.oneofs_by_name[o.name].fields}
    for n in ours.nested_types:
        _same_message(n, theirs.nested_types_by_name[n.name])
    for e in ours.enum_types:
        _same_enum(e, theirs.enum_types_by_name[e.name])


def test_wire_compatible_with_tritonclient_in_the_same_process() -> None:
    """Every message, field, enum and RPC we declare matches Triton's, and both load side by side."""
    pb = kserve_proto.messages()
    theirs = descriptor_pool.Default()
    assert pb.pool is not theirs
    for cls in pb.classes.values():
        d = cls.DESCRIPTOR
        _same_message(d, theirs.FindMessageTypeByName(d.full_name))
    for name in ("DataType",):
        _same_enum(pb.pool.FindEnumTypeByName(f"inference.{name}"),
                   theirs.FindEnumTypeByName(f"inference.{name}"))
    ours = pb.pool.FindServiceByName(kserve_proto.SERVICE)
    their_service = theirs.FindServiceByName(kserve_proto.SERVICE)
    for m in ours.methods:
        t = their_service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name,
                                                                     t.output_type.full_name)
        assert (m.client_streaming, m.server_streaming) == (t.client_streaming, t.server_streaming)
    # a message made by one side parses on the other
    req = pb.ModelInferRequest(model_name="tiny", id="7")
    req.parameters["sequence_id"].string_param = "abc"
    back = service_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert back.parameters["sequence_id"].string_param == "abc" and back.id == "7"


# ----------------------------------------------------------------------------- a real server
class Served:
    """An App (native + KServe on one port) on 127.0.0.1:0, run by its own event loop in a thread,
    so the synchronous tritonclient can drive it from the test."""

    def __init__(self, repo: Path, **kw) -> None:
        settings = dataclasses.replace(Settings(models=repo, host="127.0.0.1", port=0, metrics_port=-1,
                                                poll_interval=0, session_store="memory"), **kw)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = App(settings)
        self._call(self.app.start())
        self.url = f"127.0.0.1:{self.app.port}"
        self.client = tc.InferenceServerClient(self.url)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.client.close()
        self._call(self.app.stop(0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def served(tiny_repo: Path):
    s = Served(tiny_repo)
    yield s
    s.close()


def tokens_input(ids: list[int] | np.ndarray, batch: int = 1) -> tc.InferInput:
    """The `tokens` input ([batch, T] INT64) as tritonclient sends it (raw little-endian bytes)."""
    arr = np.tile(np.asarray(ids, np.int64)[None], (batch, 1))  # (B, T)
    inp = tc.InferInput("tokens", list(arr.shape), "INT64")
    inp.set_data_from_numpy(arr)
    return inp


def native_logits(url: str, model: str, chunks: list[list[int]]) -> np.ndarray:
    """The same tokens through the native protocol: one session, one feed per chunk, every step's logits."""
    with grpc.insecure_channel(url) as ch:
        stub = npb_grpc.RnnServeStub(ch)
        sid = stub.OpenSession(npb.OpenSessionRequest(open=npb.Open(model=npb.ModelRef(name=model)))).session_id
        out = []
        for ids in chunks:
            r = stub.Step(npb.StepRequest(session_id=sid, feed=npb.Feed(
                tokens=npb.TokenIds(ids=ids), output=npb.OUTPUT_ALL, logits=True)))
            out.extend(d.logits for d in r.result.distributions)
        stub.CloseSession(npb.CloseSessionRequest(session_id=sid))
    return np.asarray(out, np.float32)  # (n, V)


class StreamCollector:
    """start_stream's callback: answers by request id, errors in arrival order."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def __call__(self, result, error) -> None:
        self.q.put((result, error))

    def take(self, n: int) -> list:
        return [self.q.get(timeout=20) for _ in range(n)]


def status_of(e: InferenceServerException) -> str:
    return str(e.status())


# ----------------------------------------------------------------------------- health, metadata, config
def test_live_ready_metadata_config(served: Served) -> None:
    c = served.client
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("tiny") and c.is_model_ready("tiny", "1")
    assert not c.is_model_ready("nope") and not c.is_model_ready("tiny", "2")
    assert "sequence" in c.get_server_metadata().extensions
    md = c.get_model_metadata("tiny-lstm")
    meta = json.loads((served.app.settings.models / "tiny-lstm" / "1" / "model.json").read_text())
    assert list(md.versions) == ["1"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("tokens", "INT64", [1, -1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [
        ("logits", "FP32", [1, -1, len(meta["vocab"])]), ("state", "FP32", [1, meta["state_size"]])]
    cfg = c.get_model_config("tiny").config
    assert cfg.name == "tiny" and cfg.HasField("sequence_batching")
    assert [i.name for i in cfg.input] == ["tokens"] and [o.name for o in cfg.output] == ["logits", "state"]
    assert cfg.sequence_batching.max_sequence_idle_microseconds == int(1800 * 1e6)
    assert cfg.version_policy.latest.num_versions == 1
    with pytest.raises(InferenceServerException) as e:
        c.get_model_metadata("nope")
    assert "NOT_FOUND" in status_of(e.value) and "'nope' is not loaded" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.get_model_config("tiny", "x1")
    assert "INVALID_ARGUMENT" in status_of(e.value) and "model_version" in e.value.message()
    extensions = set(c.get_server_metadata().extensions)
    assert {"statistics", "model_repository"} <= extensions, extensions
    stats = c.get_inference_statistics("tiny").model_stats  # the statistics extension (tests/test_statistics.py)
    assert [(s.name, s.version) for s in stats] == [("tiny", "1")]
    with pytest.raises(InferenceServerException) as e:
        c.get_inference_statistics("nope")
    assert "NOT_FOUND" in status_of(e.value) and "'nope' is not loaded" in e.value.message()
    with pytest.raises(InferenceServerException) as e:  # an RPC the server does not declare
        c.get_system_shared_memory_status()
    assert "UNIMPLEMENTED" in status_of(e.value)


# ----------------------------------------------------------------------------- stateless
def test_infer_stateless_from_the_initial_state(served: Served, tiny_repo: Path) -> None:
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    want = Reference(tiny_repo, "tiny").feed(ids)  # (T, V)
    for _ in range(2):  # nothing is kept between stateless requests
        r = served.client.infer("tiny", [tokens_input(ids)], request_id="s1")
        assert r.get_response().id == "s1"
        assert r.as_numpy("state") is None  # only when asked for
        np.testing.assert_allclose(r.as_numpy("logits")[0], want, atol=1e-5)
    ref = Reference(tiny_repo, "tiny-gru")
    want = ref.feed(ids)
    r = served.client.infer("tiny-gru", [tokens_input(ids)],
                            outputs=[tc.InferRequestedOutput("logits"), tc.InferRequestedOutput("state")])
    np.testing.assert_allclose(r.as_numpy("logits")[0], want, atol=1e-5)
    np.testing.assert_allclose(r.as_numpy("state"), ref.state, atol=1e-5)
    with pytest.raises(InferenceServerException) as e:  # batch of 2
        served.client.infer("tiny", [tokens_input(ids, batch=2)])
    assert "INVALID_ARGUMENT" in status_of(e.value) and "batch dimension 2" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        served.client.infer("tiny", [tokens_input([0, 10_000])])
    assert "INVALID_ARGUMENT" in status_of(e.value) and "token id 10000 at position 1" in e.value.message()


# ----------------------------------------------------------------------------- sequences on a stream
def test_three_interleaved_sequences_match_onnx_loop_and_native(served: Served, tiny_repo: Path) -> None:
    rng = np.random.default_rng(5)
    # (model, sequence id): an int id, a string id, and the same int id on another model
    seqs = [("tiny", 11), ("tiny", "alpha"), ("tiny-lstm", 11)]
    vocab = {m: len(Reference(tiny_repo, m).meta["vocab"]) for m, _ in seqs}
    plans = {k: [rng.integers(vocab[k[0]], size=int(n)).tolist() for n in rng.integers(1, 5, size=6)]
             for k in seqs}
    col = StreamCollector()
    served.client.start_stream(callback=col)
    try:
        sent = 0
        for step in range(6):  # interleave: every sequence's step i before any step i+1, not waiting
            for model, sid in seqs:
                served.client.async_stream_infer(
                    model, [tokens_input(plans[(model, sid)][step])], request_id=f"{model}|{sid}|{step}",
                    sequence_id=sid, sequence_start=step == 0, sequence_end=step == 5)
                sent += 1
        answers = col.take(sent)
    finally:
        served.client.stop_stream()
    got: dict = {k: {} for k in seqs}
    for result, error in answers:
        assert error is None, error
        model, sid, step = result.get_response().id.split("|")
        key = (model, int(sid) if sid.isdigit() else sid)
        got[key][int(step)] = result.as_numpy("logits")[0]  # (T, V)
    for key in seqs:
        stream = np.concatenate([got[key][i] for i in range(6)])
        flat = [t for chunk in plans[key] for t in chunk]
        np.testing.assert_allclose(stream, Reference(tiny_repo, key[0]).feed(flat), atol=1e-5)
        np.testing.assert_allclose(stream, native_logits(served.url, key[0], plans[key]), atol=1e-5)


def test_end_reuse_restart_and_errors_keep_the_stream(served: Served) -> None:
    col = StreamCollector()
    c = served.client
    c.start_stream(callback=col)
    try:
        c.async_stream_infer("tiny", [tokens_input([1, 2])], request_id="a", sequence_id=77, sequence_start=True)
        c.async_stream_infer("tiny", [tokens_input([3])], request_id="b", sequence_id=77, sequence_end=True)
        c.async_stream_infer("tiny", [tokens_input([4])], request_id="c", sequence_id=77)  # ended
        c.async_stream_infer("tiny", [tokens_input([4])], request_id="d", sequence_id="never")
        c.async_stream_infer("tiny", [tokens_input([4], batch=3)], request_id="e", sequence_id=78,
                             sequence_start=True)
        c.async_stream_infer("tiny", [tokens_input([5])], request_id="f", sequence_id=79, sequence_start=True)
        c.async_stream_infer("tiny", [tokens_input([6])], request_id="g", sequence_id=79, sequence_start=True)
        res = col.take(7)
        # the stream is still usable after the errors
        c.async_stream_infer("tiny", [tokens_input([7])], request_id="h", sequence_id=79, sequence_end=True)
        (last, err), = col.take(1)
    finally:
        c.stop_stream()
    ok = {r.get_response().id: r for r, e in res if e is None}
    errors = [str(e) for r, e in res if e is not None]
    assert set(ok) == {"a", "b", "f", "g"}
    assert any("NOT_FOUND" in m and "sequence id 77 of model 'tiny' was ended by a request with sequence_end"
               in m and "sequence_start=true" in m and "'c'" in m for m in errors), errors
    assert any("NOT_FOUND" in m and "sequence id 'never' of model 'tiny' was never started" in m
               for m in errors), errors
    assert any("INVALID_ARGUMENT" in m and "batch dimension 3" in m for m in errors), errors
    params = ok["g"].get_response().parameters
    assert params["sequence_restarted"].bool_param and "sequence_restarted" not in ok["f"].get_response().parameters
    assert err is None and last.get_response().id == "h"
    # unary ModelInfer: the same errors as gRPC status codes
    with pytest.raises(InferenceServerException) as e:
        c.infer("tiny", [tokens_input([1])], sequence_id=77)
    assert "NOT_FOUND" in status_of(e.value) and "was ended" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        c.infer("tiny", [tokens_input([1])], sequence_id=77, sequence_start=True,
                outputs=[tc.InferRequestedOutput("hidden")])
    assert "INVALID_ARGUMENT" in status_of(e.value) and "'hidden'" in e.value.message()


def test_idle_timeout_names_the_expiry(tiny_repo: Path) -> None:
    s = Served(tiny_repo, idle_timeout=0.3)
    try:
        r = s.client.infer("tiny", [tokens_input([1])], sequence_id="slow", sequence_start=True,
                           outputs=[tc.InferRequestedOutput("logits")])
        sid = r.get_response().parameters["rnnserve_session_id"].string_param
        assert sid in s.app.engine.table.live  # a sequence is an ordinary engine session
        time.sleep(0.8)
        assert sid not in s.app.engine.table.live
        with pytest.raises(InferenceServerException) as e:
            s.client.infer("tiny", [tokens_input([2])], sequence_id="slow")
        msg = e.value.message()
        assert "NOT_FOUND" in status_of(e.value)
        assert "sequence id 'slow' of model 'tiny' expired after 0.3 s idle" in msg and "sequence_start" in msg
        assert s.client.get_model_config("tiny").config.sequence_batching.max_sequence_idle_microseconds == 300_000
    finally:
        s.close()


def test_versions_are_visible_and_a_sequence_keeps_its_version(tiny_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    shutil.copytree(repo / "tiny" / "1", repo / "tiny" / "2")
    meta = json.loads((repo / "tiny" / "2" / "model.json").read_text())
    (repo / "tiny" / "2" / "model.json").write_text(json.dumps({**meta, "version": 2}))
    s = Served(repo, serve_versions=0)
    try:
        c = s.client
        assert list(c.get_model_metadata("tiny").versions) == ["1", "2"]
        assert c.get_model_config("tiny").config.version_policy.HasField("all")
        assert c.is_model_ready("tiny", "1") and c.is_model_ready("tiny", "2")
        assert c.infer("tiny", [tokens_input([1])]).get_response().model_version == "2"  # latest
        r = c.infer("tiny", [tokens_input([1])], model_version="1", sequence_id=5, sequence_start=True)
        assert r.get_response().model_version == "1"
        assert c.infer("tiny", [tokens_input([2])], sequence_id=5).get_response().model_version == "1"
        with pytest.raises(InferenceServerException) as e:
            c.infer("tiny", [tokens_input([3])], model_version="2", sequence_id=5)
        assert "INVALID_ARGUMENT" in status_of(e.value) and "runs on version 1" in e.value.message()
    finally:
        s.close()


def test_reflection_describes_both_services(served) -> None:
    """grpc reflection (what grpcurl uses) describes every method of both protocols, types included,
    though the KServe descriptors live in a private pool."""
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(served.url) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"inference.GRPCInferenceService", "rnnserve.v1.RnnServe", "grpc.health.v1.Health"} <= services
        pool = descriptor_pool.DescriptorPool(db)
        ours = {"inference.GRPCInferenceService": kserve_proto.messages().pool,
                "rnnserve.v1.RnnServe": descriptor_pool.Default()}
        for name, local in ours.items():
            described, known = pool.FindServiceByName(name), local.FindServiceByName(name)
            assert [m.name for m in described.methods] == [m.name for m in known.methods]
            for m in described.methods:
                k = known.methods_by_name[m.name]
                for got, want in ((m.input_type, k.input_type), (m.output_type, k.output_type)):
                    assert got.full_name == want.full_name
                    assert [f.name for f in got.fields] == [f.name for f in want.fields], got.full_name
        infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
        assert "parameters" in infer.fields_by_name and "raw_input_contents" in infer.fields_by_name

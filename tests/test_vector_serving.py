"""Vector models served: frames in over both protocols, class probabilities and forecasts out, the same
numbers as a plain onnxruntime loop per device, and every wrong-kind call refused with INVALID_ARGUMENT."""
from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import rnnserve.v1.rnnserve_pb2 as pb
import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
import tritonclient.grpc as tc
from conftest import MEAN, STD
from test_kserve import Served, status_of
from tritonclient.utils import InferenceServerException

F = 3


class Device:
    """One device's frames run alone through model.onnx, one frame at a time, from the model's initial state."""

    def __init__(self, repo: Path, name: str) -> None:
        d = repo / name / "1"
        meta = json.loads((d / "model.json").read_text())
        self.sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        self.state = np.asarray(meta["initial_state"], np.float32)[None]  # (1, S)

    def feed(self, frames: np.ndarray) -> np.ndarray:
        out = []
        for x in frames:  # (F,)
            o, self.state = self.sess.run(None, {"inputs": x[None], "state": self.state})
            out.append(o[0])
        return np.stack(out)  # (T, O)

    def rollout(self, last: np.ndarray, horizon: int) -> np.ndarray:
        """The forecaster's next steps from here, each mean fed back, without moving this device's state."""
        state, out = self.state, []
        for _ in range(horizon):
            last, state = self.sess.run(None, {"inputs": last[None, :F], "state": state})
            last = last[0]
            out.append(last)
        return np.stack(out)  # (H, O)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def frames(rng: np.random.Generator, n: int) -> np.ndarray:
    return (MEAN + STD * rng.standard_normal((n, F))).astype(np.float32)  # raw units: the graphs normalise


@pytest.fixture(scope="module")
def served(mixed_repo: Path):
    s = Served(mixed_repo)
    yield s
    s.close()


def frames_input(x: np.ndarray) -> tc.InferInput:
    i = tc.InferInput("inputs", [1, *x.shape], "FP32")
    i.set_data_from_numpy(x[None].astype(np.float32))
    return i


def test_many_devices_interleaved_over_kserve_equal_each_device_alone(served: Served, mixed_repo: Path) -> None:
    """24 devices on the forecaster stream 1-4 frames per request, interleaved on one stream, some with a
    horizon: every answer (mean, spread, rolled-out forecast) equals that device's own onnxruntime loop."""
    rng = np.random.default_rng(3)
    devices = {k: (Device(mixed_repo, "fc"), frames(rng, 12)) for k in range(1, 25)}
    pos = dict.fromkeys(devices, 0)
    sent: dict[str, tuple[int, np.ndarray, int]] = {}
    results: list = []
    client = tc.InferenceServerClient(served.url)
    client.start_stream(callback=lambda result, error: results.append((result, error)))
    n = 0
    while any(p < 12 for p in pos.values()):
        k = int(rng.choice([d for d, p in pos.items() if p < 12]))
        t = min(12 - pos[k], int(rng.integers(1, 5)))
        x = devices[k][1][pos[k]:pos[k] + t]
        horizon = int(rng.integers(1, 4)) if rng.random() < 0.3 else 0
        rid = f"r{n}"
        outs = ["mean", "spread"] + (["forecast_mean", "forecast_spread"] if horizon else [])
        client.async_stream_infer("fc", [frames_input(x)], request_id=rid, sequence_id=k, sequence_start=pos[k] == 0,
                                  sequence_end=pos[k] + t == 12, outputs=[tc.InferRequestedOutput(o) for o in outs],
                                  parameters={"horizon": horizon} if horizon else None)
        sent[rid] = (k, x, horizon)
        pos[k] += t
        n += 1
    client.stop_stream()
    client.close()
    assert len(results) == n and all(e is None for _, e in results), [e for _, e in results if e][:3]
    # a device's requests are answered in order; run each device's reference in that order
    for r, _ in sorted(results, key=lambda re: int(re[0].get_response().id[1:])):
        k, x, horizon = sent[r.get_response().id]
        dev = devices[k][0]
        want = dev.feed(x)  # (T, 6): mean then log_var
        assert np.allclose(r.as_numpy("mean")[0], want[:, :F], atol=1e-5)
        assert np.allclose(r.as_numpy("spread")[0], np.exp(0.5 * want[:, F:]), rtol=1e-5, atol=1e-6)
        if horizon:
            roll = dev.rollout(want[-1], horizon)
            assert r.as_numpy("forecast_mean").shape == (1, horizon, F)
            assert np.allclose(r.as_numpy("forecast_mean")[0], roll[:, :F], atol=1e-5)
            assert np.allclose(r.as_numpy("forecast_spread")[0], np.exp(0.5 * roll[:, F:]), rtol=1e-5, atol=1e-6)


def test_classifier_over_kserve_gives_probabilities(served: Served, mixed_repo: Path) -> None:
    x = frames(np.random.default_rng(5), 7)
    want = softmax(Device(mixed_repo, "cls").feed(x))  # (T, 4)
    cfg = served.client.get_model_config("cls", as_json=True)["config"]
    assert json.loads(cfg["parameters"]["classes"]["string_value"]) == ["w", "x", "y", "z"]
    assert cfg["parameters"]["features"]["string_value"] == "3" and "vocab" not in cfg["parameters"]
    assert [i["name"] for i in cfg["input"]] == ["inputs"]
    r = served.client.infer("cls", [frames_input(x)])  # stateless: from the initial state
    assert [o.name for o in r.get_response().outputs] == ["probabilities"]
    assert np.allclose(r.as_numpy("probabilities")[0], want, atol=1e-6)
    # one frame at a time on a sequence: the running answer
    for t in range(7):
        r = served.client.infer("cls", [frames_input(x[t:t + 1])], sequence_id="dev-a", sequence_start=t == 0,
                                sequence_end=t == 6)
        assert np.allclose(r.as_numpy("probabilities")[0, 0], want[t], atol=1e-6)
    # a stateless forecast of 4 steps from the frames given
    fx = frames(np.random.default_rng(6), 5)
    dev = Device(mixed_repo, "fc")
    roll = dev.rollout(dev.feed(fx)[-1], 4)
    r = served.client.infer("fc", [frames_input(fx)], parameters={"horizon": 4})
    assert np.allclose(r.as_numpy("forecast_mean")[0], roll[:, :F], atol=1e-5)


def test_native_frames_probabilities_and_horizon(served: Served, mixed_repo: Path) -> None:
    x = frames(np.random.default_rng(8), 6)
    with grpc.insecure_channel(served.url) as ch:
        stub = pb_grpc.RnnServeStub(ch)
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert (models["cls"].input_kind, models["cls"].features, models["cls"].task) == ("vector", F, "classify")
        assert list(models["cls"].classes) == ["w", "x", "y", "z"] and models["fc"].output_size == 2 * F
        assert models["tiny"].input_kind == "tokens" and models["tiny"].task == "lm"
        o = stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="cls"))))
        dev = Device(mixed_repo, "cls")
        for t in range(6):
            res = stub.Step(pb.StepRequest(session_id=o.session_id, feed=pb.Feed(
                frames=pb.Frames(values=x[t].tolist(), features=F), output=pb.OUTPUT_LAST, top_k=2))).result
            p = softmax(dev.feed(x[t:t + 1]))[0]
            assert np.allclose(res.distributions[0].probs, p, atol=1e-6)
            assert list(res.distributions[0].top_ids) == list(np.argsort(-p)[:2])
        o = stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name="fc"))))
        dev = Device(mixed_repo, "fc")
        res = stub.Step(pb.StepRequest(session_id=o.session_id, feed=pb.Feed(
            frames=pb.Frames(values=x.reshape(-1).tolist()), output=pb.OUTPUT_ALL, horizon=3, logits=True))).result
        want = dev.feed(x)
        assert res.fed == 6 and res.steps == 6 and len(res.distributions) == 6 and len(res.forecast) == 3
        assert np.allclose([d.logits for d in res.distributions], want, atol=1e-5)
        assert np.allclose([d.mean for d in res.forecast], dev.rollout(want[-1], 3)[:, :F], atol=1e-5)
        # the rollout did not move the session: the next frame answers as the device alone
        res = stub.Step(pb.StepRequest(session_id=o.session_id, feed=pb.Feed(
            frames=pb.Frames(values=x[0].tolist()), output=pb.OUTPUT_LAST))).result
        assert np.allclose(res.distributions[0].mean, dev.feed(x[:1])[0, :F], atol=1e-5) and res.steps == 7


NATIVE_BAD = [  # (model, feed, words the message must contain)
    ("cls", pb.Feed(text="abc"), "takes frames of 3 floats"),
    ("cls", pb.Feed(tokens=pb.TokenIds(ids=[1, 2, 3])), "not token ids"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1.0, 2.0]), output=pb.OUTPUT_LAST), "not whole frames of 3"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1.0] * 6, features=4)), "frames.features = 4"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1.0] * 4, features=4)), "4 features each, model cls:1 takes 3"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1.0, float("nan"), 2.0])), "frame 0 feature 1 is nan"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1.0, 2.0, 3.0, 4.0, 5.0, float("inf")])), "frame 1 feature 2 is inf"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1e39, 2.0, 3.0])), "frame 0 feature 0 is inf"),
    ("cls", pb.Feed(frames=pb.Frames()), "feed has no frames"),
    ("cls", pb.Feed(frames=pb.Frames(values=[1.0, 2.0, 3.0]), horizon=2), "horizon is for forecasting models"),
    ("fc", pb.Feed(frames=pb.Frames(values=[1.0, 2.0, 3.0]), horizon=10**9), "horizon must be in [1,"),
    ("fc", pb.Feed(frames=pb.Frames(values=[1.0, 2.0, 3.0]), top_k=2), "top_k is for token and class"),
    ("tiny", pb.Feed(frames=pb.Frames(values=[1.0, 2.0, 3.0])), "takes token ids or text, not float frames"),
]


def test_native_wrong_kind_and_bad_frames_are_invalid_argument(served: Served, mixed_repo: Path) -> None:
    """Each refusal names the problem, and the session answers afterwards as if it had never come."""
    x = frames(np.random.default_rng(9), 2)
    with grpc.insecure_channel(served.url) as ch:
        stub = pb_grpc.RnnServeStub(ch)
        sids = {m: stub.OpenSession(pb.OpenSessionRequest(open=pb.Open(model=pb.ModelRef(name=m)))).session_id
                for m in ("cls", "fc", "tiny")}
        step = stub.Step(pb.StepRequest(session_id=sids["cls"], feed=pb.Feed(frames=pb.Frames(values=x[0].tolist()),
                                                                             output=pb.OUTPUT_LAST)))
        for model, feed, words in NATIVE_BAD:
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(pb.StepRequest(session_id=sids[model], feed=feed))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (model, feed, e.value.details())
            assert words in e.value.details(), (words, e.value.details())
        # generation on a vector model, in a Session stream
        reqs = [pb.SessionRequest(resume=pb.Resume(session_id=sids["cls"])),
                pb.SessionRequest(request_id=2, generate=pb.Generate(max_tokens=3))]
        answers = list(stub.Session(iter(reqs)))
        assert answers[-1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "not a generation" in answers[-1].error.message
        step = stub.Step(pb.StepRequest(session_id=sids["cls"], feed=pb.Feed(frames=pb.Frames(values=x[1].tolist()),
                                                                             output=pb.OUTPUT_LAST)))
        dev = Device(mixed_repo, "cls")
        assert step.result.steps == 2
        assert np.allclose(step.result.distributions[0].probs, softmax(dev.feed(x))[1], atol=1e-6)


def test_kserve_wrong_kind_and_bad_frames_are_invalid_argument(served: Served) -> None:
    c = served.client
    tok = tc.InferInput("tokens", [1, 2], "INT64")
    tok.set_data_from_numpy(np.array([[1, 2]], np.int64))
    wide = tc.InferInput("inputs", [1, 2, 4], "FP32")
    wide.set_data_from_numpy(np.zeros((1, 2, 4), np.float32))
    fp64 = tc.InferInput("inputs", [1, 1, 3], "FP64")
    fp64.set_data_from_numpy(np.zeros((1, 1, 3), np.float64))
    nan = frames_input(np.array([[1.0, np.nan, 2.0]], np.float32))
    inf = frames_input(np.array([[1.0, 2.0, -np.inf]], np.float32))
    cases = [
        ("cls", [tok], {}, "takes exactly one input named 'inputs'"),
        ("cls", [wide], {}, "must have shape [1, T, 3]"),
        ("cls", [fp64], {}, "must be FP32"),
        ("cls", [nan], {"sequence_id": 77, "sequence_start": True}, "frame 0 feature 1 is nan"),
        ("fc", [inf], {}, "frame 0 feature 2 is -inf"),
        ("cls", [frames_input(np.zeros((1, 3), np.float32))], {"parameters": {"horizon": 2}}, "forecasting models"),
        ("tiny", [frames_input(np.zeros((1, 3), np.float32))], {}, "is a token model"),
        ("tiny", [tok], {"parameters": {"horizon": 2}}, "forecasting models"),
        ("cls", [frames_input(np.zeros((1, 3), np.float32))], {"outputs": [tc.InferRequestedOutput("logits")]},
         "has no output(s) ['logits']"),
        ("fc", [frames_input(np.zeros((1, 3), np.float32))], {"outputs": [tc.InferRequestedOutput("forecast_mean")]},
         "has no output(s) ['forecast_mean']"),
    ]
    for model, inputs, kw, words in cases:
        with pytest.raises(InferenceServerException) as e:
            c.infer(model, inputs, **kw)
        assert status_of(e.value) == "StatusCode.INVALID_ARGUMENT", (model, words, e.value)
        assert words in e.value.message(), (words, e.value.message())
    # the NaN arrived with sequence_start: nothing was started
    with pytest.raises(InferenceServerException) as e:
        c.infer("cls", [frames_input(np.zeros((1, 3), np.float32))], sequence_id=77)
    assert status_of(e.value) == "StatusCode.NOT_FOUND"


def test_a_device_continues_across_a_restart_on_the_sqlite_store(mixed_repo: Path, tmp_path: Path) -> None:
    """A vector session's state and last outputs survive the process like a token session's: a KServe sequence
    started on one server continues on the next, as the device alone would."""
    x = frames(np.random.default_rng(11), 6)
    dev = Device(mixed_repo, "fc")
    first = Served(mixed_repo, session_store="sqlite", state_dir=tmp_path / "state")
    try:
        r = first.client.infer("fc", [frames_input(x[:4])], sequence_id="sensor-1", sequence_start=True)
        assert np.allclose(r.as_numpy("mean")[0], dev.feed(x[:4])[:, :F], atol=1e-5)
    finally:
        first.close()
    second = Served(mixed_repo, session_store="sqlite", state_dir=tmp_path / "state")
    try:
        r = second.client.infer("fc", [frames_input(x[4:])], sequence_id="sensor-1", sequence_end=True,
                                parameters={"horizon": 2})
        want = dev.feed(x[4:])
        assert np.allclose(r.as_numpy("mean")[0], want[:, :F], atol=1e-5)
        assert np.allclose(r.as_numpy("forecast_mean")[0], dev.rollout(want[-1], 2)[:, :F], atol=1e-5)
    finally:
        second.close()

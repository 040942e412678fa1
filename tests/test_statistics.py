"""Triton's statistics extension on the KServe endpoint, read by the real tritonclient (what perf_analyzer
reads), and scripts/perf_input.py's --input-data files fed through the real server."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import rnnserve.v1.rnnserve_pb2 as npb
import rnnserve.v1.rnnserve_pb2_grpc as npb_grpc
import tritonclient.grpc as tc
from test_kserve import Served, StreamCollector, status_of, tokens_input
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def served(tiny_repo: Path):
    s = Served(tiny_repo)
    yield s
    s.close()


def stats_of(client: tc.InferenceServerClient, model: str, version: str = "") -> dict:
    """ModelStatistics of one version as plain numbers."""
    (s,) = client.get_inference_statistics(model, version).model_stats
    i = s.inference_stats
    return {"name": s.name, "version": s.version, "last": s.last_inference, "inferences": s.inference_count,
            "executions": s.execution_count,
            **{f"{k}_{f}": getattr(getattr(i, k), f) for k in ("success", "fail", "queue", "compute_input",
                                                               "compute_infer", "compute_output")
               for f in ("count", "ns")},
            "batches": {b.batch_size: (b.compute_infer.count, b.compute_infer.ns, b.compute_input.count,
                                       b.compute_output.count) for b in s.batch_stats}}


def test_statistics_move_with_sequence_traffic(served: Served) -> None:
    """Zero at load; N stream requests of three sequences (single tokens and multi-token feeds): success N,
    executions and queue/compute time above zero, batch sizes listed, a refused request counted as failed,
    native traffic in executions only; unknown model or version: NOT_FOUND."""
    c = served.client
    assert "statistics" in c.get_server_metadata().extensions
    zero = stats_of(c, "tiny")
    assert (zero["name"], zero["version"]) == ("tiny", "1")
    assert all(v == 0 for k, v in zero.items() if k not in ("name", "version", "batches")), zero
    assert zero["batches"] == {}

    col = StreamCollector()
    c.start_stream(callback=col)
    plans = {sid: [[3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13]] for sid in (101, 102, 103)}
    t0 = time.time()
    try:
        n = 0
        for step in range(4):  # interleaved, not waiting: the batcher steps the sequences together
            for sid, plan in plans.items():
                c.async_stream_infer("tiny", [tokens_input(plan[step])], request_id=f"{sid}|{step}", sequence_id=sid,
                                     sequence_start=step == 0, sequence_end=step == 3)
                n += 1
        answers = col.take(n)
        c.async_stream_infer("tiny", [tokens_input([10_000])], request_id="bad", sequence_id=104,
                             sequence_start=True)  # an out-of-vocabulary id: refused inside the stream
        (_, err), = col.take(1)
    finally:
        c.stop_stream()
    assert all(e is None for _, e in answers) and err is not None and "INVALID_ARGUMENT" in str(err)
    c.infer("tiny", [tokens_input([1, 2, 3])])  # a unary stateless request
    with pytest.raises(InferenceServerException):
        c.infer("tiny", [tokens_input([1])], sequence_id=999)  # never started: a failed request

    s = stats_of(c, "tiny")
    assert s["success_count"] == s["inferences"] == n + 1
    assert s["fail_count"] == 2 and s["fail_ns"] > 0
    assert s["success_ns"] > 0 and s["executions"] > 0
    assert s["queue_count"] == s["compute_infer_count"] == s["executions"]
    assert s["compute_input_count"] == s["compute_output_count"] == s["executions"]  # perf_analyzer checks this
    assert s["queue_ns"] > 0 and s["compute_infer_ns"] > 0  # the multi-token feeds always queue
    assert s["batches"] and all(rows >= 1 and calls >= 1 and ns > 0 and ci == co == calls
                                for rows, (calls, ns, ci, co) in s["batches"].items())
    assert sum(calls for calls, *_ in s["batches"].values()) <= s["executions"]
    assert int(t0 * 1000) - 1000 <= s["last"] <= int(time.time() * 1000) + 1000
    assert stats_of(c, "tiny", "1") == s
    other = stats_of(c, "tiny-gru")  # no traffic there
    assert other["success_count"] == other["executions"] == 0

    with grpc.insecure_channel(served.url) as ch:  # native traffic: executions, not KServe requests
        stub = npb_grpc.RnnServeStub(ch)
        sid = stub.OpenSession(npb.OpenSessionRequest(open=npb.Open(model=npb.ModelRef(name="tiny")))).session_id
        stub.Step(npb.StepRequest(session_id=sid, feed=npb.Feed(tokens=npb.TokenIds(ids=[1, 2, 3]))))
        stub.CloseSession(npb.CloseSessionRequest(session_id=sid))
    after = stats_of(c, "tiny")
    assert after["success_count"] == s["success_count"] and after["executions"] > s["executions"]

    every = c.get_inference_statistics().model_stats  # no name: every loaded version
    assert sorted((m.name, m.version) for m in every) == [("tiny", "1"), ("tiny-gru", "1"), ("tiny-lstm", "1")]
    for name, version, needle in (("nope", "", "'nope' is not loaded"), ("tiny", "2", "version 2"),
                                  ("", "1", "without a model name")):
        with pytest.raises(InferenceServerException) as e:
            c.get_inference_statistics(name, version)
        want = "INVALID_ARGUMENT" if not name else "NOT_FOUND"
        assert want in status_of(e.value) and needle in e.value.message(), e.value


# ----------------------------------------------------------------------------- perf_input.py
def perf_input(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "perf_input.py"), *args], check=False,
                          capture_output=True, text=True, timeout=60)


def play(client: tc.InferenceServerClient, model: str, data: dict, base_id: int) -> list:
    """Play every stream of an --input-data file as one sequence each (as perf_analyzer does), on one stream."""
    col = StreamCollector()
    client.start_stream(callback=col)
    n = 0
    try:
        for k, stream in enumerate(data["data"]):
            for step, entry in enumerate(stream):
                (name, tensor), = entry.items()
                dtype = "INT64" if name == "tokens" else "FP32"
                arr = np.asarray(tensor["content"], np.int64 if dtype == "INT64" else np.float32)
                inp = tc.InferInput(name, tensor["shape"], dtype)
                inp.set_data_from_numpy(arr.reshape(tensor["shape"]))
                client.async_stream_infer(model, [inp], request_id=f"{k}|{step}", sequence_id=base_id + k,
                                          sequence_start=step == 0, sequence_end=step == len(stream) - 1)
                n += 1
        return col.take(n)
    finally:
        client.stop_stream()


def test_perf_input_files_are_accepted_by_the_model(tmp_path: Path, tiny_repo: Path) -> None:
    """The script's data for a token model (random ids and --text) and for the shipped vector model play
    through the server without one refusal; a character outside the vocabulary, or no such model, is an
    error naming it (exit 1); bad usage exits 2."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo / "tiny", repo / "tiny")
    shutil.copytree(ROOT / "models" / "japanese-vowels", repo / "japanese-vowels")
    files = {}
    for key, args in (("random", ["tiny", "--repo", str(repo), "--streams", "3", "--length", "5"]),
                      ("text", [str(repo / "tiny" / "1"), "--text", "First Citizen:", "--streams", "2",
                                "--length", "20"]),
                      ("vector", ["japanese-vowels", "--repo", str(repo), "--streams", "2", "--length", "4"])):
        r = perf_input(*args, "-o", str(tmp_path / f"{key}.json"))
        assert r.returncode == 0, r.stderr
        files[key] = json.loads((tmp_path / f"{key}.json").read_text())
    vocab = json.loads((repo / "tiny" / "1" / "model.json").read_text())["vocab"]
    ids = [e["tokens"]["content"][0] for s in files["random"]["data"] for e in s]
    assert len(ids) == 15 and all(0 <= t < len(vocab) for t in ids)
    assert [vocab[e["tokens"]["content"][0]] for e in files["text"]["data"][0][:14]] == list("First Citizen:")
    frame = files["vector"]["data"][0][0]["inputs"]
    assert frame["shape"] == [1, 1, 12] and len(frame["content"]) == 12

    s = Served(repo)
    try:
        for key, model in (("random", "tiny"), ("text", "tiny"), ("vector", "japanese-vowels")):
            answers = play(s.client, model, files[key], 1000 * len(key))
            assert [e for _, e in answers if e is not None] == [], key
            assert len(answers) == sum(len(st) for st in files[key]["data"])
        assert stats_of(s.client, "japanese-vowels")["success_count"] == 8
    finally:
        s.close()

    bad = perf_input("tiny", "--repo", str(repo), "--text", "Zebra€")
    assert bad.returncode == 1 and "outside the model's vocabulary" in bad.stderr and "€" in bad.stderr
    missing = perf_input("nope", "--repo", str(repo))
    assert missing.returncode == 1 and "nope" in missing.stderr
    usage = perf_input("tiny", "--repo", str(repo), "--streams", "0")
    assert usage.returncode == 2 and "--streams" in usage.stderr
    unwritable = perf_input("tiny", "--repo", str(repo), "-o", str(tmp_path / "no-such-dir" / "x.json"))
    assert unwritable.returncode == 1 and unwritable.stderr.strip() == (
        f"perf_input.py: error: --output {tmp_path / 'no-such-dir' / 'x.json'}: cannot write it (No such file or "
        "directory)")

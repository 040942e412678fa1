"""Several devices streaming frames at once on one KServe stream, with tritonclient (Triton sequence ids =
devices): the running answer of each device after every frame, and the accuracy over the utterances.

    make serve                                    # in another terminal: rnn-serve on 127.0.0.1:8001
    .venv/bin/python scripts/stream_devices.py [--target 127.0.0.1:8001] [--model japanese-vowels]
        [--csv data/japanese_vowels/test.csv] [--devices 8] [--limit N] [--quiet]

Each device takes the file's utterances in turn (device d streams utterances d, d + N, d + 2N, ...), one
frame per request: `sequence_start` on an utterance's first frame, `sequence_end` on its last, then the
device's next utterance starts a new sequence on the same id. Every tick, each device sends one frame on
the shared stream and the tick waits for all of their answers (`probabilities` after the frames so far, or
a forecaster's `mean`). Prints a line per tick with every device's running answer (not with --quiet), a line
per finished utterance, and the accuracy over the finished utterances that have a label. Class names come
from ListModels on the native protocol (same port); without them the class index is shown.
Exit status: 0 done, 1 a server error, 2 a bad flag or file.
"""
from __future__ import annotations

import argparse
import os
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as tc
from rnnserve.client import Client, RnnServeError
from rnnserve.client.frames_csv import FrameSeries, FramesFileError, read_csv
from tritonclient.utils import InferenceServerException

ROOT = Path(__file__).resolve().parents[1]


def class_names(target: str, model: str) -> list[str]:
    """The model's class names from the native ListModels (empty for a forecaster or an unknown model)."""
    with Client(target, timeout=10) as c:
        for m in c.list_models():
            if m.name == model and m.latest:
                return list(m.classes)
    return []


class Devices:
    """N devices on one tritonclient stream, each streaming its utterances one frame per request."""

    def __init__(self, client: tc.InferenceServerClient, model: str, devices: int, series: list[FrameSeries]):
        self.client, self.model = client, model
        self.queues = {d: series[d - 1::devices] for d in range(1, devices + 1)}  # sequence id -> utterances
        self.at = dict.fromkeys(self.queues, 0)  # the frame each device sends next, in its current utterance
        self.answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def tick(self) -> dict[int, tuple[FrameSeries, int, dict[str, np.ndarray]]]:
        """Every device with frames left sends its next one; returns {device: (utterance, frames sent so
        far, its outputs)} once all have answered."""
        sent: dict[str, tuple[int, FrameSeries, int]] = {}
        for dev, utterances in self.queues.items():
            if not utterances:
                continue
            u, t = utterances[0], self.at[dev]
            x = tc.InferInput("inputs", [1, 1, u.frames.shape[1]], "FP32")
            x.set_data_from_numpy(u.frames[None, t:t + 1])  # [1, 1, F]: this device's next frame
            rid = f"{dev}/{u.id}/{t}"
            self.client.async_stream_infer(self.model, [x], request_id=rid, sequence_id=dev,
                                           sequence_start=t == 0, sequence_end=t == len(u.frames) - 1)
            sent[rid] = (dev, u, t + 1)
            self.at[dev] = t + 1
            if t + 1 == len(u.frames):  # the utterance is over: the next one starts a new sequence
                utterances.pop(0)
                self.at[dev] = 0
        out = {}
        for _ in sent:
            result, error = self.answers.get(timeout=60)
            if error is not None:
                raise error
            r = result.get_response()
            dev, u, n = sent[r.id]
            out[dev] = (u, n, {o.name: result.as_numpy(o.name)[0, -1] for o in r.outputs})
        return out

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def answer(outputs: dict[str, np.ndarray], classes: list[str]) -> tuple[str, str]:
    """(short running answer, predicted class name or "") from one answer's outputs."""
    if "probabilities" in outputs:
        p = outputs["probabilities"]
        k = int(np.argmax(p))
        name = classes[k] if k < len(classes) else str(k)
        return f"{name}:{p[k]:.2f}", name
    mean = outputs["mean"]
    return "[" + " ".join(f"{v:.3g}" for v in mean[:3]) + (" ...]" if len(mean) > 3 else "]"), ""


def main(argv: list[str] | None = None) -> int:
    """Stream the file's utterances over --devices devices and print the running answers and the accuracy."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="127.0.0.1:8001", help="server HOST:PORT (default 127.0.0.1:8001)")
    p.add_argument("--model", default="japanese-vowels", help="a vector model (default japanese-vowels)")
    p.add_argument("--csv", default=str(ROOT / "data" / "japanese_vowels" / "test.csv"),
                   help="frames in rnn-train's CSV layout (default data/japanese_vowels/test.csv)")
    p.add_argument("--devices", type=int, default=8, help="devices streaming at once, >= 1 (default 8)")
    p.add_argument("--limit", type=int, default=0, help="stream only the first N utterances (default 0 = all)")
    p.add_argument("--quiet", action="store_true", help="no per-tick lines: only finished utterances")
    a = p.parse_args(argv)
    if a.devices < 1 or a.limit < 0:
        p.error("--devices must be >= 1 and --limit >= 0")
    try:
        data = read_csv(a.csv)
    except FramesFileError as err:
        p.error(f"--csv {err}")
    series = list(data.series[:a.limit] if a.limit else data.series)
    try:
        classes = class_names(a.target, a.model)
    except RnnServeError as err:
        print(f"stream_devices: error: {err}", file=sys.stderr)
        return 1
    devices = Devices(tc.InferenceServerClient(a.target), a.model, min(a.devices, len(series)), series)
    right = labelled = ticks = 0
    try:
        while any(devices.queues.values()):
            answers = devices.tick()
            ticks += 1
            if not a.quiet:
                print(f"tick {ticks:4d}  " + "  ".join(f"d{d}:{u.id}@{n} {answer(o, classes)[0]}"
                                                     for d, (u, n, o) in sorted(answers.items())))
            for d, (u, n, o) in sorted(answers.items()):
                if n == len(u.frames):
                    text, name = answer(o, classes)
                    label = u.labels[-1] if u.labels else ""
                    if label and name:
                        labelled += 1
                        right += name == label
                    print(f"device {d}  {u.id}  {n} frames  -> {text}" + (f"  label {label}" if label else ""))
    except InferenceServerException as err:  # a server error, or the server unreachable
        print(f"stream_devices: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (| head): nothing more to print, not even at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except queue.Empty:
        print(f"stream_devices: error: no answer from {a.target} within 60 s", file=sys.stderr)
        return 1
    finally:
        devices.close()
    if labelled:
        frames = sum(len(s.frames) for s in series)
        print(f"accuracy {right}/{labelled} = {right / labelled:.1%} over {len(series)} utterances on "
              f"{len(devices.queues)} devices ({frames} frames, one per request; {ticks} ticks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

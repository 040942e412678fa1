"""Write an `--input-data` JSON for Triton's perf_analyzer that a model accepts: in-vocabulary token ids for a
token model (`tokens`, INT64 [1, 1] a request), in-distribution frames for a vector model (`inputs`, FP32
[1, 1, F] a request, drawn around model.json's per-feature mean and std).

perf_analyzer's default random INT64 data is out of every vocabulary (the server refuses it as
INVALID_ARGUMENT). The file holds --streams data streams of --length requests each: perf_analyzer plays one
stream per sequence (correlation id), looping it up to --sequence-length.

    python scripts/perf_input.py shakespeare -o /tmp/shakespeare.json            # models/shakespeare, its default
    python scripts/perf_input.py models/japanese-vowels/1 --streams 8 -o /tmp/jv.json
    python scripts/perf_input.py shakespeare --text "ROMEO: But soft, what light" -o /tmp/romeo.json

MODEL is a version folder, a model folder (its default version: default.json, else the highest), or a
model name in --repo. Exit 0 on success, 1 for a model that cannot be read, 2 for bad usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rnnserve.server.contract import (
    META_FILE,
    ModelFormatError,
    ModelMeta,
    read_default,
    read_meta,
    version_numbers,
)


def version_dir(model: str, repo: Path, version: int | None) -> Path:
    """The version folder MODEL names (see the module's docstring); ValueError saying what is missing."""
    p = Path(model)
    if not p.is_dir():
        p = repo / model
        if not p.is_dir():
            raise ValueError(f"{model}: neither a folder nor a model in {repo}")
    if (p / META_FILE).is_file():
        if version is not None:
            raise ValueError(f"{model} is a version folder already: --version does not apply")
        return p
    versions = version_numbers(p)
    if not versions:
        raise ValueError(f"{p}: no version folders (<N>/{META_FILE})")
    if version is None:
        try:
            pointer = read_default(p)
        except ModelFormatError:
            pointer = None
        version = pointer.version if pointer is not None and pointer.version in versions else versions[-1]
    if version not in versions:
        raise ValueError(f"{p} has no version {version} (versions: {', '.join(map(str, versions))})")
    return p / str(version)


def token_streams(meta: ModelMeta, streams: int, length: int, text: str | None, seed: int) -> list[list[int]]:
    """Token ids a stream: the text's characters from staggered offsets, or seeded uniform draws from the vocab."""
    vocab = list(meta.vocab)
    if text is not None:
        unknown = sorted({c for c in text if c not in vocab})
        if unknown:
            raise ValueError(f"--text has characters outside the model's vocabulary: {unknown!r}")
        ids = [vocab.index(c) for c in text]
        return [[ids[(s * len(ids) // streams + i) % len(ids)] for i in range(length)] for s in range(streams)]
    rng = np.random.default_rng(seed)
    return rng.integers(0, len(vocab), size=(streams, length)).tolist()


def frame_streams(meta: ModelMeta, streams: int, length: int, seed: int) -> np.ndarray:
    """Frames (streams, length, F) float32: mean + std * N(0, 1) per feature, as the model was trained on."""
    spec = meta.input_spec
    mean, std = np.asarray(spec["mean"], np.float64), np.asarray(spec["std"], np.float64)
    rng = np.random.default_rng(seed)
    return (mean + std * rng.standard_normal((streams, length, len(mean)))).astype(np.float32)


def input_data(vdir: Path, streams: int, length: int, text: str | None = None, seed: int = 0) -> dict[str, Any]:
    """perf_analyzer's --input-data object for the version at vdir."""
    meta = read_meta(vdir)
    if meta.input_kind == "vector":
        if text is not None:
            raise ValueError(f"{vdir} is a vector model: --text is for token models")
        frames = frame_streams(meta, streams, length, seed)
        return {"data": [[{"inputs": {"content": [round(float(x), 6) for x in f], "shape": [1, 1, len(f)]}}
                          for f in s] for s in frames]}
    return {"data": [[{"tokens": {"content": [t], "shape": [1, 1]}} for t in s]
                     for s in token_streams(meta, streams, length, text, seed)]}


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring)."""
    p = argparse.ArgumentParser(prog="perf_input.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="a version folder, a model folder, or a model name in --repo")
    p.add_argument("--repo", type=Path, default=Path("models"), help="model repository (default: models)")
    p.add_argument("--version", type=int, help="with a model folder or name: this version (default: the default)")
    p.add_argument("--streams", type=int, default=4, help="data streams, one per sequence (default 4)")
    p.add_argument("--length", type=int, default=64, help="requests per stream (default 64)")
    p.add_argument("--text", help="token models: feed this text's characters instead of random ids")
    p.add_argument("--seed", type=int, default=0, help="seed of the random ids or frames (default 0)")
    p.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    a = p.parse_args(argv)
    for flag, value in (("--streams", a.streams), ("--length", a.length)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if a.version is not None and a.version < 1:
        p.error(f"--version must be >= 1, got {a.version}")
    if a.text is not None and not a.text:
        p.error("--text must not be empty")
    try:
        data = input_data(version_dir(a.model, a.repo, a.version), a.streams, a.length, a.text, a.seed)
        out = json.dumps(data, separators=(",", ":")) + "\n"
        if a.output is None:
            sys.stdout.write(out)
        else:
            try:
                a.output.write_text(out, encoding="utf-8")
            except OSError as e:
                raise OSError(f"--output {a.output}: cannot write it ({e.strerror or e})") from None
    except (ValueError, OSError) as e:  # ModelFormatError is a ValueError
        print(f"perf_input.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

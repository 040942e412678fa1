"""Regenerate data/japanese_vowels/{train,test}.csv from the copy of JapaneseVowels that aeon ships.

A maintainer step, never run by the trainer, the server or the tests (they read the CSVs in data/).
aeon is not a dependency of rnnserve; install it somewhere else and run this with that interpreter:

    python -m venv /tmp/aeon && /tmp/aeon/bin/pip install aeon==1.6.0
    /tmp/aeon/bin/python scripts/ship_japanese_vowels.py            # writes data/japanese_vowels/*.csv

The CSVs are rnn-train's sequence layout (trainer/series.py): one row per frame, columns id (train000 ..,
test000 ..), t (the frame index), c01..c12 (the 12 LPC cepstrum coefficients, exactly as aeon stores
them) and label (the speaker, 1..9). data/japanese_vowels/SOURCE.md names the origin and licence.
"""
from __future__ import annotations

import argparse
import csv
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, prefix: str, xs: list, ys: list) -> int:
    """One CSV in the trainer's layout; returns the number of frames written."""
    frames = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "t", *[f"c{k:02d}" for k in range(1, 13)], "label"])
        for i, (x, y) in enumerate(zip(xs, ys)):  # x: (12, T) channels first
            for t in range(x.shape[1]):
                w.writerow([f"{prefix}{i:03d}", t, *[repr(float(v)) for v in x[:, t]], str(y)])
                frames += 1
    return frames


def main(argv: list[str] | None = None) -> int:
    """Load both splits through aeon and write them as CSV."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "data" / "japanese_vowels"), help="output folder")
    a = p.parse_args(argv)
    try:
        from aeon.datasets import load_japanese_vowels
    except ImportError:
        print("ship_japanese_vowels: error: aeon is not installed for this interpreter (pip install aeon==1.6.0)",
              file=sys.stderr)
        return 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        xs, ys = load_japanese_vowels(split=split.upper())
        n = write(out / f"{split}.csv", split, list(xs), list(ys))
        lengths = [x.shape[1] for x in xs]
        print(f"{out / (split + '.csv')}: {len(xs)} sequences, {n} frames, lengths {min(lengths)}-{max(lengths)}, "
              f"from aeon {metadata.version('aeon')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

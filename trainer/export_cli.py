"""rnn-export: one checkpoint (`rnn-export CKPT`), many (`rnn-export batch`), or a repository's index (`list`).

Only dispatch and argument parsing live here; each command imports what it needs when it runs, so
`rnn-export list` and a mistyped path answer without loading torch.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..server.contract import META_FILE
from .publish import ExportError


def build_parser() -> argparse.ArgumentParser:
    """Flags of the single export; `rnn-export batch -h` and `rnn-export list -h` have their own."""
    p = argparse.ArgumentParser(prog="rnn-export", description="Publish a checkpoint as the next version of a model.",
                                epilog="Also: rnn-export batch CHECKPOINT... | rnn-export list REPO")
    p.add_argument("checkpoint", help="checkpoint file written by rnn-train")
    p.add_argument("--repo", default="models", help="model repository folder (default: models)")
    p.add_argument("--name", help="model name (default: the checkpoint's stem, or its folder for ckpt.pt)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--eval-corpus", help="UTF-8 corpus: record onnxruntime's loss on its last 10%% as val_loss")
    p.add_argument("--eval-series", help="sequence model: a .csv/.npz test set; onnxruntime's accuracy or "
                   "forecast error on it is recorded as metrics.test_*")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console script: single export, or dispatch to `batch` / `list`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("batch", "list"):
        if argv[0] == "batch":
            from .batch_export import main_batch

            return main_batch(argv[1:])
        from .listing import main_list

        return main_list(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        text = None
        if args.eval_corpus:
            from .data import load_text

            text = load_text(args.eval_corpus)
        if not Path(args.checkpoint).is_file():  # before importing torch: a typo answers at once
            raise ExportError(f"checkpoint {args.checkpoint} does not exist or is not a file")
        from .export import default_name, export_checkpoint

        name = args.name or default_name(args.checkpoint)
        path = export_checkpoint(args.checkpoint, args.repo, name, args.version, eval_text=text,
                                 eval_series=args.eval_series)
    except (ValueError, OSError) as e:  # ExportError, CheckpointError, CorpusError, ModelFormatError, I/O
        print(f"rnn-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnn-export: interrupted; nothing was published", file=sys.stderr)
        return 130
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    tests = {k: v for k, v in meta["metrics"].items() if k.startswith("test_")}
    print(json.dumps({"path": str(path), "name": meta["name"], "version": meta["version"],
                      "val_loss": meta["metrics"]["val_loss"], **tests, "checks": meta["checks"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""rnn-export: one checkpoint (`rnn-export CKPT`), many (`rnn-export batch`), a repository's index (`list`),
or an explicit promotion (`promote REPO NAME VERSION`).

Only dispatch and argument parsing live here; each command imports what it needs when it runs, so
`rnn-export list` and a mistyped path answer without loading torch. After publishing, the promotion rule
(--promote, trainer.promote) decides whether the new version becomes the default; --load then asks a
running server (its KServe endpoint) to load it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..server.contract import META_FILE
from .promote import (
    add_load_flags,
    add_promotion_flags,
    apply_rule,
    load_after_publish,
    load_credentials,
    pin,
)
from .publish import check_name, name_arg, naming_repo


def _bad_input(e: BaseException) -> bool:
    """A checkpoint, --eval-corpus or --eval-series that cannot be used: a usage error (exit 2)."""
    from .checkpoint import CheckpointError
    from .data import CorpusError
    from .publish import FlagMismatch
    from .series import SeriesError

    return isinstance(e, (CheckpointError, CorpusError, SeriesError, FlagMismatch))


def build_parser() -> argparse.ArgumentParser:
    """Flags of the single export; `rnn-export batch -h` and `rnn-export list -h` have their own."""
    p = argparse.ArgumentParser(prog="rnn-export", description="Publish a checkpoint as the next version of a model.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Also: rnn-export batch CHECKPOINT... | rnn-export list REPO | "
                                       "rnn-export promote REPO NAME VERSION\n\nexit status: 0 published; 1 the "
                                       "export failed (checks, writing the repository, the promotion rule, --load); "
                                       "2 usage error: a bad flag, or a checkpoint / --eval-corpus / --eval-series "
                                       "that is missing or cannot be used; 130 interrupted")
    p.add_argument("checkpoint", help="checkpoint file written by rnn-train")
    p.add_argument("--repo", default="models", help="model repository folder (default: models)")
    p.add_argument("--name", type=name_arg, help="model name (default: the checkpoint's stem, or its folder for ckpt.pt)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--eval-corpus", help="UTF-8 corpus: record onnxruntime's loss on its last 10%% as val_loss "
                   "(default: none: val_loss stays the one rnn-train recorded)")
    p.add_argument("--eval-series", help="sequence model: a .csv/.npz test set; onnxruntime's accuracy or "
                   "forecast error on it is recorded as metrics.test_* (default: none: rnn-train's test_* stay)")
    add_promotion_flags(p)
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR (default: WARNING)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console script: single export, or dispatch to `batch` / `list`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("batch", "list", "promote"):
        if argv[0] == "batch":
            from .batch_export import main_batch

            return main_batch(argv[1:])
        if argv[0] == "promote":
            return main_promote(argv[1:])
        from .listing import main_list

        return main_list(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version is not None and args.version < 1:
        parser.error(f"argument --version: must be a positive integer (or left out: the next free one), got "
                     f"{args.version}")
    credentials = load_credentials(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        text = None
        if args.eval_corpus:
            from .data import load_text

            text = load_text(args.eval_corpus)
        if not Path(args.checkpoint).is_file():  # before importing torch: a typo answers at once
            print(f"rnn-export: error: checkpoint {args.checkpoint} does not exist or is not a file", file=sys.stderr)
            return 2
        from .export import default_name, export_checkpoint

        name = check_name(args.name or default_name(args.checkpoint))
        if args.promote != "always":
            pin(args.repo, name)
        path = export_checkpoint(args.checkpoint, args.repo, name, args.version, eval_text=text,
                                 eval_series=args.eval_series)
    except (ValueError, OSError) as e:  # ExportError, CheckpointError, CorpusError, ModelFormatError, I/O
        e = naming_repo(e, args.repo)
        print(f"rnn-export: error: {e}", file=sys.stderr)
        return 2 if _bad_input(e) else 1
    except KeyboardInterrupt:
        print("rnn-export: interrupted; nothing was published", file=sys.stderr)
        return 130
    meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
    version, failed = meta["version"], None
    try:
        decision = apply_rule(args.repo, name, version, args.promote).to_json()
    except (ValueError, OSError) as e:
        failed = f"version {version} of {name} was published, but the promotion rule failed: {e}"
        decision = {"promoted": False, "default": None, "promotion": failed}
    except KeyboardInterrupt:
        print(f"rnn-export: interrupted; version {version} of {name} was published, not promoted", file=sys.stderr)
        return 130
    tests = {k: v for k, v in meta["metrics"].items() if k.startswith("test_")}
    print(json.dumps({"path": str(path), "name": meta["name"], "version": version,
                      "val_loss": meta["metrics"]["val_loss"], **tests, "checks": meta["checks"], **decision}))
    if failed:
        print(f"rnn-export: error: {failed}", file=sys.stderr)
        return 1
    promoted = "promoted" if decision["promoted"] else "not promoted"
    print(f"rnn-export: {name} version {version} published, {promoted}: {decision['promotion']}", file=sys.stderr)
    if args.load:
        try:
            return load_after_publish(args, credentials, name, version,
                                      f"version {version} of {name} was published ({promoted})")
        except KeyboardInterrupt:
            print(f"rnn-export: interrupted; version {version} of {name} was published ({promoted}), its load was "
                  "not confirmed", file=sys.stderr)
            return 130
    return 0


def main_promote(argv: list[str]) -> int:
    """`rnn-export promote REPO NAME VERSION`: make a usable version the default for new sessions."""
    from .promote import promote

    p = argparse.ArgumentParser(prog="rnn-export promote", description="Make a published version the default for "
                                "new sessions (writes REPO/NAME/default.json; a polling server follows it).")
    p.add_argument("repo", help="model repository folder")
    p.add_argument("name", help="model name")
    p.add_argument("version", type=int, help="the version to make the default")
    p.add_argument("--reason", default="", help="why, recorded in default.json (default: promoted by hand)")
    add_load_flags(p)
    a = p.parse_args(argv)
    if a.version < 1:
        p.error(f"VERSION must be a positive integer, got {a.version}")
    credentials = load_credentials(p, a)
    if not Path(a.repo).is_dir():
        print(f"rnn-export promote: error: repository {a.repo} does not exist or is not a folder", file=sys.stderr)
        return 2  # a usage error: the command line names a folder that is not there
    try:
        decision = promote(a.repo, check_name(a.name), a.version, a.reason)
        print(f"{a.name} version {a.version} is the default: {decision.reason}")
        if a.load:
            return load_after_publish(a, credentials, a.name, a.version,
                                      f"version {a.version} of {a.name} was promoted", "rnn-export promote")
    except (ValueError, OSError) as e:
        print(f"rnn-export promote: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rnn-export promote: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

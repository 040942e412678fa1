"""The default pointer: which version of a model new sessions get (written by rnn-export, read by the server)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .meta import (
    ModelFormatError,
    _pos_int,
    _short,
)

# ==================================================================================================
# The default pointer: which version new sessions get (written by rnn-export, read by the server).
#
# `<root>/<name>/default.json` = {"version": N, "reason": "why N is the default", "at": "ISO time"}
# ("reason" and "at" optional). When the file is absent the default is the model's highest serveable
# version, so repositories from before the pointer keep working. The server loads the pointer's version
# beside its --serve-versions window; a pointer that does not parse, or names a version that is not
# serveable, is logged and the default falls back to the highest version (never a crash). The file is
# replaced in one rename, so a reader sees the old pointer or the new one, never half of one.
# ==================================================================================================
DEFAULT_FILE = "default.json"
DEFAULT_KEYS = ("version", "reason", "at")


@dataclass(frozen=True)
class DefaultPointer:
    """A model's default.json: the version new sessions get and why."""

    version: int
    reason: str = ""
    at: str = ""  # when it was written (ISO 8601), "" if not said

    def to_json(self) -> dict[str, Any]:
        """The file's object (empty fields left out)."""
        out: dict[str, Any] = {"version": self.version}
        if self.reason:
            out["reason"] = self.reason
        if self.at:
            out["at"] = self.at
        return out


def parse_default(obj: Any, where: str | Path = DEFAULT_FILE) -> DefaultPointer:
    """Check a default.json object; ModelFormatError naming the file and the problem."""
    if not isinstance(obj, dict):
        raise ModelFormatError(f"{where}: must be a JSON object such as {{\"version\": 1}}")
    unknown = sorted(set(obj) - set(DEFAULT_KEYS))
    if unknown:
        raise ModelFormatError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_KEYS)})")
    if not _pos_int(obj.get("version")):
        raise ModelFormatError(f"{where}: version must be a positive integer, got {_short(obj.get('version'))}")
    for key in ("reason", "at"):
        if not isinstance(obj.get(key, ""), str):
            raise ModelFormatError(f"{where}: {key} must be a string, got {_short(obj[key])}")
    return DefaultPointer(obj["version"], obj.get("reason", ""), obj.get("at", ""))


def read_default(name_dir: str | Path) -> DefaultPointer | None:
    """A model folder's default pointer, None when it has none; ModelFormatError when it is broken."""
    path = Path(name_dir) / DEFAULT_FILE
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise ModelFormatError(f"{path}: unreadable: {e}") from None
    return parse_default(obj, path)


def write_default(name_dir: str | Path, pointer: DefaultPointer) -> Path:
    """Write a model's default.json atomically (temp file, fsync, rename); returns its path."""
    import os

    name_dir = Path(name_dir)
    parse_default(pointer.to_json(), name_dir / DEFAULT_FILE)  # never write what a reader would refuse
    path = name_dir / DEFAULT_FILE
    tmp = name_dir / f".{DEFAULT_FILE}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(pointer.to_json(), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path

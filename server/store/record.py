"""A session as the store keeps it: a versioned record, and its bytes.

The bytes are `RNSS`, one byte of schema version, a length-prefixed JSON header, then the state and
(when the session has one) the last step's logits as little-endian float32. A newer server reads
every older schema it knows; a record of a schema it does not know is refused with a clear error
(never misread).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"RNSS"
SCHEMA = 1  # the schema this server writes
READABLE = (1,)  # the schemas it reads


class RecordError(ValueError):
    """Bytes that are not a session record this server can read; the message says why."""


@dataclass(frozen=True)
class Record:
    """Everything needed to continue a session exactly, on this process or another."""

    id: str
    model: str  # model name
    version: int  # model version the session runs on
    state: np.ndarray  # (S,) float32
    logits: np.ndarray | None  # (V,) float32: the last step's distribution (None before the first feed)
    steps: int  # tokens consumed
    principal: str = ""  # who opened it ("" without authentication)
    idle_timeout: float = 0.0  # seconds of idleness before it expires (0 = never)
    touched: float = 0.0  # wall-clock time of its last use

    @property
    def deadline(self) -> float:
        """Wall-clock time it expires at (0 = never)."""
        return self.touched + self.idle_timeout if self.idle_timeout > 0 else 0.0


def encode(r: Record) -> bytes:
    """A record's bytes (schema SCHEMA)."""
    state = np.ascontiguousarray(r.state, "<f4")
    logits = b"" if r.logits is None else np.ascontiguousarray(r.logits, "<f4").tobytes()
    header = json.dumps({"id": r.id, "model": r.model, "version": r.version, "steps": r.steps,
                         "principal": r.principal, "idle_timeout": r.idle_timeout, "touched": r.touched,
                         "state": int(state.size), "logits": len(logits) // 4}, separators=(",", ":")).encode()
    return MAGIC + bytes([SCHEMA]) + struct.pack("<I", len(header)) + header + state.tobytes() + logits


def decode(data: bytes) -> Record:
    """A record from its bytes; RecordError when they are damaged or of a schema this server does not know."""
    if len(data) < 9 or data[:4] != MAGIC:
        raise RecordError("not a session record (bad magic)")
    schema = data[4]
    if schema not in READABLE:
        raise RecordError(f"session record schema {schema} is not one this server reads ({READABLE}); "
                          "it was written by a newer rnnserve")
    (n,) = struct.unpack_from("<I", data, 5)
    try:
        h = json.loads(data[9:9 + n])
        s_len, l_len = int(h["state"]), int(h["logits"])
        body = data[9 + n:]
        if len(body) != 4 * (s_len + l_len):
            raise RecordError(f"session record body has {len(body)} bytes, its header says {4 * (s_len + l_len)}")
        state = np.frombuffer(body, "<f4", s_len).astype(np.float32)
        logits = np.frombuffer(body, "<f4", l_len, 4 * s_len).astype(np.float32) if l_len else None
        return Record(id=str(h["id"]), model=str(h["model"]), version=int(h["version"]), state=state,
                      logits=logits, steps=int(h["steps"]), principal=str(h.get("principal", "")),
                      idle_timeout=float(h.get("idle_timeout", 0.0)), touched=float(h.get("touched", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"damaged session record: {e}") from None

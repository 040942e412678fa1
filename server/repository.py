"""The model repository: scan models/<name>/<version>/, verify each version, open its onnxruntime sessions."""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

FILES = ("model.onnx", "sequence.onnx")
CELLS = ("elman", "gru", "lstm")


class LoadError(Exception):
    """A version folder that cannot be served; the message says why."""


@dataclass(eq=False)
class ModelVersion:
    """One loaded version: its metadata, vocabulary and the two onnxruntime sessions."""

    name: str
    version: int
    path: Path
    meta: dict
    vocab: list[str]
    state_size: int
    initial_state: np.ndarray  # (S,) float32
    step: ort.InferenceSession
    sequence: ort.InferenceSession
    char_ids: dict[str, int] = field(default_factory=dict)
    step_gen: ort.InferenceSession | None = None  # model.onnx with generation's threading (None: step)

    def __post_init__(self) -> None:
        self.char_ids = {c: i for i, c in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.vocab)

    @property
    def key(self) -> str:
        """name:version, for logs and metric labels."""
        return f"{self.name}:{self.version}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_meta(vdir: Path) -> dict:
    """Read and check model.json and the checksums of the files it lists (torch-free)."""
    try:
        meta = json.loads((vdir / "model.json").read_text())
    except FileNotFoundError:
        raise LoadError("model.json is missing") from None
    except (OSError, ValueError) as e:
        raise LoadError(f"model.json is unreadable: {e}") from None
    if not isinstance(meta, dict):
        raise LoadError("model.json is not an object")
    for key in ("name", "version", "cell", "vocab", "state_size", "initial_state", "files"):
        if key not in meta:
            raise LoadError(f"model.json lacks {key!r}")
    if meta["cell"] not in CELLS:
        raise LoadError(f"model.json cell {meta['cell']!r} is not one of {CELLS}")
    vocab = meta["vocab"]
    if not (isinstance(vocab, list) and vocab and all(isinstance(c, str) and len(c) == 1 for c in vocab)):
        raise LoadError("model.json vocab must be a non-empty list of 1-character strings")
    if len(set(vocab)) != len(vocab):
        raise LoadError("model.json vocab has duplicates")
    if not isinstance(meta["state_size"], int) or meta["state_size"] < 1:
        raise LoadError("model.json state_size must be a positive integer")
    if len(meta["initial_state"]) != meta["state_size"]:
        raise LoadError(f"initial_state has length {len(meta['initial_state'])}, state_size is {meta['state_size']}")
    if str(meta["version"]) != vdir.name:
        raise LoadError(f"model.json version {meta['version']} does not match the folder {vdir.name}")
    for name in FILES:
        want = meta["files"].get(name) if isinstance(meta["files"], dict) else None
        if not want:
            raise LoadError(f"model.json lists no sha256 for {name}")
        if not (vdir / name).is_file():
            raise LoadError(f"{name} is missing")
        got = _sha256(vdir / name)
        if got != want:
            raise LoadError(f"{name} sha256 {got[:12]}... does not match model.json {str(want)[:12]}...")
    return meta


def _check_io(sess: ort.InferenceSession, fname: str, rank: int, state_size: int, vocab: int) -> None:
    """Inputs tokens int64 / state float32 (.., S); outputs logits float32 (.., V) / state_out (.., S)."""
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    for name, want in (("tokens", "tensor(int64)"), ("state", "tensor(float)")):
        if name not in ins:
            raise LoadError(f"{fname} has no input {name!r} (has {sorted(ins)})")
        if ins[name].type != want:
            raise LoadError(f"{fname} input {name!r} is {ins[name].type}, expected {want}")
    for name in ("logits", "state_out"):
        if name not in outs:
            raise LoadError(f"{fname} has no output {name!r} (has {sorted(outs)})")
        if outs[name].type != "tensor(float)":
            raise LoadError(f"{fname} output {name!r} is {outs[name].type}, expected tensor(float)")
    checks = (("tokens", ins, rank, None), ("state", ins, 2, state_size),
              ("logits", outs, rank + 1, vocab), ("state_out", outs, 2, state_size))
    for name, table, want_rank, last in checks:
        shape = table[name].shape
        if len(shape) != want_rank:
            raise LoadError(f"{fname} {name!r} has rank {len(shape)}, expected {want_rank}")
        if last is not None and isinstance(shape[-1], int) and shape[-1] != last:
            raise LoadError(f"{fname} {name!r} last dimension is {shape[-1]}, expected {last}")


def _options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # sequential execution: the inter-op pool would sit idle
    return opts


def load_version(vdir: Path, providers: list[str], threads: int = 1,
                 gen_threads: int | None = None) -> ModelVersion:
    """Verify one version folder and open its sessions; raises LoadError with the reason.

    threads: intra-op threads (0 = onnxruntime's default, one per core) for feeds. One is the serving
    default: a thread pool spinning on every core takes CPU from gRPC (on 2 cores, ping-pong @64 cost
    156 us of server CPU per step with the default threading, 84 us with one thread).
    gen_threads: the same for the step calls of batches with generating rows (big batches that keep
    onnxruntime busy, where more threads pay off: generation @64 105k -> 138k tokens/s with the default);
    when it differs from `threads`, model.onnx is opened a second time with it."""
    meta = read_meta(vdir)
    gen_threads = threads if gen_threads is None else gen_threads
    sessions = {}
    files = [("model.onnx", 1, threads), ("sequence.onnx", 2, threads)]
    if gen_threads != threads:
        files.append(("model.onnx", 1, gen_threads))
    for i, (fname, rank, n) in enumerate(files):
        try:
            sess = ort.InferenceSession(str(vdir / fname), _options(n), providers=providers)
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own Fail/InvalidGraph types)
            raise LoadError(f"{fname} does not load in onnxruntime: {e}") from None
        _check_io(sess, fname, rank, meta["state_size"], len(meta["vocab"]))
        model_vocab = sess.get_modelmeta().custom_metadata_map.get("vocab")
        if model_vocab is not None and json.loads(model_vocab) != meta["vocab"]:
            raise LoadError(f"{fname} metadata vocab differs from model.json")
        sessions[i] = sess
    return ModelVersion(
        name=vdir.parent.name, version=int(vdir.name), path=vdir, meta=meta, vocab=list(meta["vocab"]),
        state_size=int(meta["state_size"]), initial_state=np.asarray(meta["initial_state"], np.float32),
        step=sessions[0], sequence=sessions[1], step_gen=sessions.get(2))


def _fingerprint(vdir: Path) -> tuple:
    """Cheap change detector for a version folder (sizes and mtimes), so a failure is logged once."""
    out = []
    for name in ("model.json", *FILES):
        try:
            st = (vdir / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


class Repository:
    """Owns the loaded versions: scan() loads what is new and serveable, logs each failure once."""

    def __init__(self, root: Path, providers: list[str], serve_versions: int = 1, ort_threads: int = 1,
                 ort_gen_threads: int | None = None) -> None:
        self.root = Path(root)
        self.providers = providers
        self.ort_threads = ort_threads  # 0 = onnxruntime's default
        self.ort_gen_threads = ort_gen_threads  # None = ort_threads
        self.serve_versions = serve_versions  # 0 = all
        self.loaded: dict[str, dict[int, ModelVersion]] = {}
        self._failed: dict[Path, tuple] = {}

    def candidates(self) -> dict[str, list[int]]:
        """Version folders on disk per model (positive integer names), ascending."""
        found: dict[str, list[int]] = {}
        if not self.root.is_dir():
            return found
        for mdir in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            versions = sorted(int(v.name) for v in mdir.iterdir()
                              if v.is_dir() and v.name.isdigit() and int(v.name) > 0)
            if versions:
                found[mdir.name] = versions
        return found

    def scan(self) -> tuple[list[ModelVersion], list[ModelVersion]]:
        """Load new versions within the serve policy; return (added, no longer wanted)."""
        added: list[ModelVersion] = []
        wanted: set[tuple[str, int]] = set()
        self._failed = {p: fp for p, fp in self._failed.items() if p.is_dir()}  # deleted ones are not broken
        for name, versions in self.candidates().items():
            have = self.loaded.setdefault(name, {})
            ok: list[int] = []
            for v in reversed(versions):  # newest first, until the policy is satisfied
                if self.serve_versions and len(ok) >= self.serve_versions:
                    break
                if v in have:
                    ok.append(v)
                    continue
                vdir = self.root / name / str(v)
                fp = _fingerprint(vdir)
                if self._failed.get(vdir) == fp:
                    continue
                try:
                    mv = load_version(vdir, self.providers, self.ort_threads, self.ort_gen_threads)
                except LoadError as e:
                    self._failed[vdir] = fp
                    log.error("skipping %s/%d: %s", name, v, e)
                    continue
                self._failed.pop(vdir, None)
                have[v] = mv
                added.append(mv)
                ok.append(v)
                log.info("loaded %s (%s, state %d, vocab %d)", mv.key, mv.meta["cell"], mv.state_size,
                         mv.vocab_size)
            wanted.update((name, v) for v in ok)
        removed = [mv for name, vs in self.loaded.items() for v, mv in vs.items() if (name, v) not in wanted]
        return added, removed

    @property
    def failed(self) -> list[Path]:
        """Version folders that failed to load and have not changed since (each logged once)."""
        return sorted(self._failed)

    def unload(self, mv: ModelVersion) -> None:
        """Forget a version (its sessions are released with it)."""
        self.loaded.get(mv.name, {}).pop(mv.version, None)
        if not self.loaded.get(mv.name):
            self.loaded.pop(mv.name, None)

    def get(self, name: str, version: int = 0) -> ModelVersion | None:
        """A loaded version, or the latest loaded one when version is 0."""
        versions = self.loaded.get(name)
        if not versions:
            return None
        if version == 0:
            return versions[max(versions)]
        return versions.get(version)

    def all(self) -> list[ModelVersion]:
        """Every loaded version, by name then version."""
        return [self.loaded[n][v] for n in sorted(self.loaded) for v in sorted(self.loaded[n])]

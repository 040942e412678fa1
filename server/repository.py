"""The model repository: scan models/<name>/<version>/, verify each version, open its onnxruntime sessions."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import (
    GENERATE_FILE,
    META_FILE,
    ONNX_FILES,
    OPTIONAL_FILES,
    SEQUENCE_FILE,
    STEP_FILE,
    ModelFormatError,
    ModelMeta,
    check_generate,
    check_session,
    check_version,
    open_session,
)

log = logging.getLogger(__name__)


class LoadError(Exception):
    """A version folder that cannot be served; the message says why."""


@dataclass(eq=False)
class ModelVersion:
    """One loaded version: its metadata, vocabulary and the two onnxruntime sessions."""

    name: str
    version: int
    path: Path
    meta: ModelMeta
    vocab: list[str]
    state_size: int
    initial_state: np.ndarray  # (S,) float32
    step: ort.InferenceSession
    sequence: ort.InferenceSession
    char_ids: dict[str, int] = field(default_factory=dict)
    step_gen: ort.InferenceSession | None = None  # model.onnx with generation's threading (None: step)
    generate: ort.InferenceSession | None = None  # generate.onnx, K sampled steps a call (None: not exported)

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

    @property
    def kind(self) -> str:
        """"tokens" (token ids or text in) or "vector" (float frames in), as model.json says."""
        return self.meta.input_kind

    @property
    def features(self) -> int:
        """Width F of a vector model's frames (0 for a token model)."""
        return self.meta.features or 0

    @property
    def output_size(self) -> int:
        """Last axis of the graphs' scores (O): the vocabulary, the classes or the forecast's blocks."""
        return self.meta.output_size

    @property
    def io_names(self) -> tuple[str, str]:
        """(input, output) names of model.onnx and sequence.onnx: tokens/logits or inputs/outputs."""
        return ("inputs", "outputs") if self.kind == "vector" else ("tokens", "logits")


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
    try:
        meta = check_version(vdir)
        gen_threads = threads if gen_threads is None else gen_threads
        files = [(STEP_FILE, threads), (SEQUENCE_FILE, threads)]
        if gen_threads != threads:
            files.append((STEP_FILE, gen_threads))
        sessions = []
        for fname, n in files:
            sess = open_session(vdir / fname, _options(n), providers)
            check_session(sess, vdir / fname, meta)
            sessions.append(sess)
        generate = None
        if GENERATE_FILE in meta.onnx_files:
            generate = open_session(vdir / GENERATE_FILE, _options(gen_threads), providers)
            check_session(generate, vdir / GENERATE_FILE, meta)
            check_generate(generate, sessions[0], vdir / GENERATE_FILE, meta)
    except ModelFormatError as e:
        raise LoadError(_relative(str(e), vdir)) from None
    return ModelVersion(
        name=vdir.parent.name, version=int(vdir.name), path=vdir, meta=meta, vocab=list(meta.vocab),
        state_size=meta.state_size, initial_state=meta.initial_state_array(),
        step=sessions[0], sequence=sessions[1], step_gen=sessions[2] if len(sessions) > 2 else None,
        generate=generate)


def _relative(message: str, vdir: Path) -> str:
    """The contract's message with the version folder's path left out (the log line names it already)."""
    return message.replace(f"{vdir}/", "").replace(str(vdir), ".")


def _fingerprint(vdir: Path) -> tuple:
    """Cheap change detector for a version folder (sizes and mtimes), so a failure is logged once."""
    out = []
    for name in (META_FILE, *ONNX_FILES, *OPTIONAL_FILES):
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
                log.info("loaded %s (%s, state %d, vocab %d)", mv.key, mv.meta.cell, mv.state_size,
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

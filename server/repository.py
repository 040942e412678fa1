"""The model repository: scan models/<name>/<version>/, verify each version, open its onnxruntime sessions."""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .contract import (
    DEFAULT_FILE,
    GENERATE_FILE,
    META_FILE,
    ONNX_FILES,
    OPTIONAL_FILES,
    SEQUENCE_FILE,
    STEP_FILE,
    DefaultPointer,
    ModelFormatError,
    ModelMeta,
    check_generate,
    check_session,
    check_version,
    open_session,
    read_default,
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
    """Owns the loaded versions: scan() loads what is new and serveable, logs each failure once.

    Which versions are loaded: the newest `serve_versions` serveable ones of each model (0 = all), plus the
    one its default.json names. The default (what version 0 means) is the pointer's version when that is
    loaded, else the highest loaded version."""

    def __init__(self, root: Path, providers: list[str], serve_versions: int = 1, ort_threads: int = 1,
                 ort_gen_threads: int | None = None) -> None:
        self.root = Path(root)
        self.providers = providers
        self.ort_threads = ort_threads  # 0 = onnxruntime's default
        self.ort_gen_threads = ort_gen_threads  # None = ort_threads
        self.serve_versions = serve_versions  # 0 = all
        self.loaded: dict[str, dict[int, ModelVersion]] = {}
        self._failed: dict[Path, tuple] = {}
        self.reasons: dict[Path, str] = {}  # why each failed version folder did not load
        self.pointers: dict[str, DefaultPointer] = {}  # the default.json of each model, as last read
        self.pointer_problems: dict[str, str] = {}  # a model's default.json that is not followed, and why
        self._pointer_fp: dict[str, tuple] = {}  # (size, mtime) of each default.json read, to parse it once
        self._defaults: dict[str, int] = {}  # the default version of each model at the last scan (to log moves)

    def candidates(self) -> dict[str, list[int]]:
        """Version folders on disk per model (positive integer names), ascending."""
        found: dict[str, list[int]] = {}
        for mdir in self.model_dirs():
            versions = sorted(int(v.name) for v in mdir.iterdir()
                              if v.is_dir() and v.name.isdigit() and int(v.name) > 0)
            if versions:
                found[mdir.name] = versions
        return found

    def model_dirs(self) -> list[Path]:
        """Every model folder (hidden ones, such as an exporter's temporaries, left out), by name."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def scan(self, names: Iterable[str] | None = None) -> tuple[list[ModelVersion], list[ModelVersion]]:
        """Load new versions within the serve policy; return (added, no longer wanted).

        names: only these models (None = every model folder); a named model whose folder is gone has all
        its versions no longer wanted."""
        only = None if names is None else set(names)
        added: list[ModelVersion] = []
        wanted: set[tuple[str, int]] = set()
        self._failed = {p: fp for p, fp in self._failed.items() if p.is_dir()}  # deleted ones are not broken
        self.reasons = {p: r for p, r in self.reasons.items() if p in self._failed}
        for name, versions in self.candidates().items():
            if only is not None and name not in only:
                continue
            have = self.loaded.setdefault(name, {})
            pointer = self._read_pointer(name)
            ok: list[int] = []
            for v in reversed(versions):  # newest first, until the policy is satisfied
                if self.serve_versions and len(ok) >= self.serve_versions:
                    break
                if self._load(name, v, have, added):
                    ok.append(v)
            outside = pointer is not None and pointer.version not in ok and pointer.version in versions
            if outside and self._load(name, pointer.version, have, added):  # the default, outside the window
                ok.append(pointer.version)
            wanted.update((name, v) for v in ok)
            if not have:
                del self.loaded[name]
        for name in list(self.pointers):
            if name not in self.loaded and (only is None or name in only):
                self.pointers.pop(name, None)
        removed = [mv for name, vs in self.loaded.items() for v, mv in vs.items()
                   if (only is None or name in only) and (name, v) not in wanted]
        return added, removed

    def _load(self, name: str, v: int, have: dict[int, ModelVersion], added: list[ModelVersion]) -> bool:
        """Make sure version v of a model is loaded (unless it failed before unchanged); whether it is."""
        if v in have:
            return True
        vdir = self.root / name / str(v)
        fp = _fingerprint(vdir)
        if self._failed.get(vdir) == fp:
            return False
        try:
            mv = load_version(vdir, self.providers, self.ort_threads, self.ort_gen_threads)
        except LoadError as e:
            self._failed[vdir] = fp
            self.reasons[vdir] = str(e)
            log.error("skipping %s/%d: %s", name, v, e)
            return False
        self._failed.pop(vdir, None)
        self.reasons.pop(vdir, None)
        have[v] = mv
        added.append(mv)
        log.info("loaded %s (%s, state %d, vocab %d)", mv.key, mv.meta.cell, mv.state_size, mv.vocab_size)
        return True

    def _read_pointer(self, name: str) -> DefaultPointer | None:
        """The model's default.json (parsed again only when it changed); a broken one is logged once, None."""
        path = self.root / name / DEFAULT_FILE
        try:
            st = path.stat()
            fp = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            fp = None
        if fp is not None and self._pointer_fp.get(name) == fp:
            return self.pointers.get(name)
        self._pointer_fp[name] = fp
        self.pointers.pop(name, None)
        if fp is None:
            return None
        try:
            pointer = read_default(self.root / name)
        except ModelFormatError as e:
            log.error("ignoring %s/%s: %s; the default is the highest version", name, DEFAULT_FILE,
                      _relative(str(e), self.root / name))
            self.pointer_problems[name] = f"{DEFAULT_FILE} is broken: {_relative(str(e), self.root / name)}"
            return None
        if pointer is not None:
            self.pointers[name] = pointer
        return pointer

    def note_defaults(self) -> list[tuple[str, int, str]]:
        """Log each model whose default version moved since the last call; returns (name, version, why)."""
        moved = []
        for name in sorted(self.loaded):
            version, why = self.default_of(name)
            if self._defaults.get(name) != version:
                self._defaults[name] = version
                log.info("default of %s: version %d (%s)", name, version, why)
                moved.append((name, version, why))
        for name in set(self._defaults) - set(self.loaded):
            del self._defaults[name]
        return moved

    def default_of(self, name: str) -> tuple[int, str]:
        """(the default version of a loaded model, why it is the default); (0, "") when none is loaded."""
        versions = self.loaded.get(name)
        if not versions:
            return 0, ""
        top = max(versions)
        pointer = self.pointers.get(name)
        if pointer is not None and pointer.version in versions:
            self.pointer_problems.pop(name, None)
            return pointer.version, pointer.reason or f"named by {DEFAULT_FILE}"
        if pointer is not None:
            vdir = self.root / name / str(pointer.version)
            why = self.reasons.get(vdir) or ("no such version folder" if not vdir.is_dir() else "not loaded")
            problem = f"{DEFAULT_FILE} names version {pointer.version}, which is not serveable ({why})"
            if self.pointer_problems.get(name) != problem:
                log.warning("%s: %s; the default is the highest version, %d", name, problem, top)
            self.pointer_problems[name] = problem
            return top, f"highest version ({problem})"
        problem = self.pointer_problems.get(name)
        if problem and (self.root / name / DEFAULT_FILE).exists():
            return top, f"highest version ({problem})"
        self.pointer_problems.pop(name, None)
        return top, f"highest version (no {DEFAULT_FILE})"

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
        """A loaded version, or the model's default (see default_of) when version is 0."""
        versions = self.loaded.get(name)
        if not versions:
            return None
        if version == 0:
            pointer = self.pointers.get(name)
            return versions[pointer.version if pointer is not None and pointer.version in versions else max(versions)]
        return versions.get(version)

    def all(self) -> list[ModelVersion]:
        """Every loaded version, by name then version."""
        return [self.loaded[n][v] for n in sorted(self.loaded) for v in sorted(self.loaded[n])]

"""The served model versions: the live repository, one batcher per version, retirement and unloading.

Two model control modes, as Triton's: `poll` (the default) loads every model folder at start and rescans
the repository every --poll-interval seconds; `explicit` loads only the --load-model names at start
(`*` = all) and then changes only on RepositoryModelLoad / RepositoryModelUnload (load / unload here).
Either way a version that leaves (its folder removed, out of the --serve-versions window, or its model
unloaded) is retired: it takes no new sessions, its live sessions run on to their end, and it unloads
when the last one ends.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import providers as prov
from .batcher import Batcher
from .errors import FailedPrecondition, InvalidArgument, NotFound, shown
from .repository import ModelVersion, Repository
from .sessions import Session, SessionTable
from .settings import Settings

log = logging.getLogger(__name__)
SWEEP_S = 2.0  # explicit mode without --poll-interval: how often retired versions are checked for unloading


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index: a model version (or a model, version "") and its state."""

    name: str
    version: str
    state: str  # READY | UNLOADING | UNAVAILABLE (Triton's names)
    reason: str


class Models:
    """Loads versions from the repository (and rescans it), runs a batcher per version, retires old ones."""

    def __init__(self, settings: Settings, table: SessionTable, metrics=None,
                 on_stepped: Callable[[list[Session]], None] | None = None) -> None:
        self.settings = settings
        self.table = table
        self.metrics = metrics
        self.on_stepped = on_stepped
        self.repo: Repository | None = None
        self.batchers: dict[ModelVersion, Batcher] = {}
        self.retired: set[ModelVersion] = set()
        self.on_changed: list = []  # async callables run after a scan changed what is served
        self._watcher: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one scan or control action at a time
        self.provider = ""
        self.explicit = settings.model_control == "explicit"
        self.wanted: set[str] = set()  # explicit mode: the models loaded (by --load-model or RepositoryModelLoad)
        self.unloaded: set[str] = set()  # explicit mode: models unloaded by RepositoryModelUnload

    async def start(self) -> None:
        """Choose the provider, load the repository (or the --load-model names), start batchers, watch."""
        providers, why = prov.choose(self.settings.device)
        self.provider = providers[0]
        log.info("onnxruntime provider: %s (%s)", self.provider, why)
        s = self.settings
        self.repo = Repository(s.models, providers, s.serve_versions, s.ort_threads, s.ort_gen_threads)
        names = None
        if self.explicit:
            names = s.load_model_names()
            if names == ["*"]:
                names = None
            else:
                for n in names:
                    if not (self.repo.root / n).is_dir():
                        log.error("--load-model %s: no such model folder in %s", n, s.models)
        added, removed = await asyncio.get_running_loop().run_in_executor(None, self.repo.scan, names)
        if self.explicit:
            self.wanted = {d.name for d in self.repo.model_dirs()} if names is None else set(names)
        await self._apply(added, removed)
        if not self.batchers:
            log.warning("no serveable model under %s%s", s.models,
                        " (--model-control explicit: nothing named by --load-model)" if names == [] else "")
        if self.explicit or s.poll_interval > 0:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="repository-watch")

    async def stop(self) -> None:
        """Stop watching and every batcher."""
        if self._watcher is not None:
            self._watcher.cancel()
        for b in self.batchers.values():
            await b.stop()

    async def _watch(self) -> None:
        """Poll mode: rescan every poll_interval seconds. Explicit mode: only unload retired versions whose
        sessions ended (the repository is not read). A timer, not a busy loop."""
        while True:
            await asyncio.sleep(self.settings.poll_interval or SWEEP_S)
            try:
                if self.explicit:
                    await self._sweep()
                else:
                    await self.refresh()
            except Exception:  # a bad scan must not stop serving what is loaded
                log.exception("repository scan failed")

    async def refresh(self) -> None:
        """Rescan what this mode watches: load new versions; those no longer wanted take no new sessions and
        unload when unused (explicit mode rescans only the models it loaded)."""
        async with self._lock:
            names = self.wanted if self.explicit else None
            added, removed = await asyncio.get_running_loop().run_in_executor(None, self.repo.scan, names)
            await self._apply(added, removed)

    async def _apply(self, added: list[ModelVersion], removed: list[ModelVersion]) -> None:
        """Serve what a scan added, retire what it dropped, log default moves, unload retired unused versions."""
        self._count_broken()
        for mv in added:
            self._add(mv)
        for mv in removed:
            self.repo.unload(mv)
            self.retired.add(mv)
            log.info("retired %s: no new sessions, %d live", mv.key, self.table.sessions_of(mv))
        self.repo.note_defaults()
        if added or removed:
            for hook in self.on_changed:
                await hook()
        await self._sweep()

    async def _sweep(self) -> None:
        """Unload every retired version whose last session ended (its statistics go with it)."""
        for mv in list(self.retired):
            if self.table.sessions_of(mv) == 0:
                self.retired.discard(mv)
                b = self.batchers.pop(mv, None)
                self.table.pools.pop(mv, None)
                if self.metrics is not None:
                    self.metrics.forget(mv)
                if b is not None:
                    await b.stop()
                log.info("unloaded %s", mv.key)

    def _count_broken(self) -> None:
        if self.metrics is not None:
            self.metrics.broken_versions(len(self.repo.failed))

    def _add(self, mv: ModelVersion) -> None:
        s = self.settings
        b = Batcher(mv, self.table.pool(mv), self.table, s.max_batch, s.max_wait_ms / 1000.0, self.metrics,
                    s.inline_rows, s.feed_slice_ms / 1000.0, self.on_stepped, s.gen_slice_ms / 1000.0,
                    s.batch_turns)
        b.start()
        self.batchers[mv] = b

    # -- model control (the KServe repository extension) ----------------------------------------------
    def _folder(self, name: str) -> str:
        """A model name as a folder of the repository (INVALID_ARGUMENT for anything that is not one)."""
        if not name:
            raise InvalidArgument("no model named: set model_name")
        if name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0") or len(name) > 255:
            raise InvalidArgument(f"model name {shown(name)} is not a model folder name")
        return name

    def _unknown(self, name: str) -> NotFound:
        have = ", ".join(d.name for d in self.repo.model_dirs()[:20]) or "none"
        return NotFound(f"no model folder {shown(name)} in the model repository (models: {have})")

    async def load(self, name: str) -> ModelVersion:
        """Load (or reload) a model's versions from its folder, as a scan would, and answer when done.

        Explicit mode: that model only, and it stays loaded until unloaded. Poll mode: a scan of the whole
        repository now (what the next poll would do). Versions already loaded stay loaded; FAILED_PRECONDITION
        when the model's newest version folder does not load (with why, and what is still served)."""
        name = self._folder(name)
        if not (self.repo.root / name).is_dir():
            raise self._unknown(name)
        async with self._lock:
            if self.explicit:
                self.wanted.add(name)
                self.unloaded.discard(name)
            names = {name} if self.explicit else None
            added, removed = await asyncio.get_running_loop().run_in_executor(None, self.repo.scan, names)
            await self._apply(added, removed)
        versions = self.repo.candidates().get(name, [])
        if not versions:
            raise FailedPrecondition(f"model {shown(name)} has no version folder ({name}/<N>/ with model.json "
                                     "and its graphs)")
        loaded = self.repo.loaded.get(name, {})
        newest = versions[-1]
        if newest not in loaded:
            why = self.repo.reasons.get(self.repo.root / name / str(newest), "not loaded")
            default, _ = self.repo.default_of(name)
            tail = (f"; still serving version(s) {', '.join(map(str, sorted(loaded)))} (default {default})"
                    if loaded else "; no version of it is loaded")
            raise FailedPrecondition(f"model {shown(name)} version {newest} did not load: {why}{tail}")
        return self.repo.get(name)

    async def unload(self, name: str) -> int:
        """Explicit mode: unload every version of a model (retired: live sessions run to their end, new ones
        are refused); returns how many versions. FAILED_PRECONDITION in poll mode (the folder decides)."""
        name = self._folder(name)
        if not self.explicit:
            raise FailedPrecondition("the server runs with --model-control poll: the repository folder decides "
                                     f"what is loaded (remove {name}/ to unload it), or restart it with "
                                     "--model-control explicit")
        async with self._lock:
            versions = list(self.repo.loaded.get(name, {}).values())
            if not versions and name not in self.wanted and not (self.repo.root / name).is_dir():
                raise self._unknown(name)
            self.wanted.discard(name)
            self.unloaded.add(name)
            await self._apply([], versions)
        log.info("unloaded model %s on request (%d version(s))", name, len(versions))
        return len(versions)

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model folder (and every model still loaded) with the state of each version: READY (the
        default's reason says why it is the default), UNLOADING (retired, finishing live sessions),
        UNAVAILABLE (a version that failed to load, or a model with nothing loaded, and why)."""
        repo = self.repo
        if repo is None:
            return []
        folders = {d.name for d in repo.model_dirs()}
        names = sorted(folders | set(repo.loaded) | {mv.name for mv in self.retired})
        out: list[IndexEntry] = []
        for name in names:
            rows: list[IndexEntry] = []
            default, why = repo.default_of(name)
            for v, mv in sorted(repo.loaded.get(name, {}).items()):
                rows.append(IndexEntry(name, str(v), "READY", f"default for new sessions: {why}" if v == default
                                       else ""))
            if not ready_only:
                for mv in sorted((m for m in self.retired if m.name == name), key=lambda m: m.version):
                    rows.append(IndexEntry(name, str(mv.version), "UNLOADING", "takes no new sessions; unloads "
                                           f"when its {self.table.sessions_of(mv)} live session(s) end"))
                for vdir in repo.failed:
                    if vdir.parent == repo.root / name:
                        rows.append(IndexEntry(name, vdir.name, "UNAVAILABLE", repo.reasons.get(vdir, "failed to load")))
                if not rows:
                    rows.append(IndexEntry(name, "", "UNAVAILABLE", self._why_not_loaded(name, name in folders)))
            out += rows
        return out

    def _why_not_loaded(self, name: str, has_folder: bool) -> str:
        if self.explicit and name in self.unloaded:
            return "unloaded"
        if self.explicit and name not in self.wanted:
            return "not loaded (--model-control explicit: RepositoryModelLoad loads it)"
        if has_folder and not self.repo.candidates().get(name):
            return "no version folder"
        return "no serveable version"

    # -- lookups ------------------------------------------------------------------------------------------
    def list(self) -> list[tuple[ModelVersion, bool]]:
        """Every loaded version with whether it is the default of its model (what version 0 gets)."""
        if self.repo is None:
            return []
        return [(mv, self.repo.get(mv.name) is mv) for mv in self.repo.all()]

    def is_latest(self, mv: ModelVersion) -> bool:
        """Whether this version is the one new sessions of its model get (the default)."""
        return self.repo is not None and self.repo.get(mv.name) is mv

    def get(self, name: str, version: int = 0) -> ModelVersion:
        """A loaded model version (0 = the default); NOT_FOUND naming what exists."""
        mv = self.repo.get(name, version) if self.repo else None
        if mv is not None:
            return mv
        if not name:
            raise InvalidArgument("no model named: set the model name")
        have = ", ".join(f"{m.name}:{m.version}" for m, _ in self.list()[:20]) or "none"
        what = f"model {shown(name)}" + (f" version {version}" if version else "")
        gone = next((m for m in self.retired if m.name == name and m.version == version), None)
        if gone is not None:
            raise NotFound(f"{what} was removed from the repository (or left the --serve-versions window, or was "
                           f"unloaded): it takes no new sessions and only finishes its {self.table.sessions_of(gone)} "
                           f"live ones (loaded: {have})")
        if self.explicit and name in self.unloaded:
            raise NotFound(f"{what} was unloaded (RepositoryModelUnload); load it again with RepositoryModelLoad "
                           f"(loaded: {have})")
        hint = ""
        if self.explicit and name not in self.wanted and name in {d.name for d in self.repo.model_dirs()}:
            hint = " (--model-control explicit: RepositoryModelLoad loads it)"
        raise NotFound(f"{what} is not loaded{hint} (loaded: {have})")

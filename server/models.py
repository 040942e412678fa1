"""The served model versions: the live repository, one batcher per version, retirement and unloading."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from . import providers as prov
from .batcher import Batcher
from .errors import InvalidArgument, NotFound, shown
from .repository import ModelVersion, Repository
from .sessions import Session, SessionTable
from .settings import Settings

log = logging.getLogger(__name__)


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
        self.provider = ""

    async def start(self) -> None:
        """Choose the provider, load the repository, start a batcher per version, watch for changes."""
        providers, why = prov.choose(self.settings.device)
        self.provider = providers[0]
        log.info("onnxruntime provider: %s (%s)", self.provider, why)
        s = self.settings
        self.repo = Repository(s.models, providers, s.serve_versions, s.ort_threads, s.ort_gen_threads)
        loop = asyncio.get_running_loop()
        added, _ = await loop.run_in_executor(None, self.repo.scan)
        self._count_broken()
        for mv in added:
            self._add(mv)
        if not self.batchers:
            log.warning("no serveable model under %s", s.models)
        if s.poll_interval > 0:
            self._watcher = loop.create_task(self._watch(), name="repository-watch")

    async def stop(self) -> None:
        """Stop watching and every batcher."""
        if self._watcher is not None:
            self._watcher.cancel()
        for b in self.batchers.values():
            await b.stop()

    async def _watch(self) -> None:
        """Rescan the repository every poll_interval seconds (a timer, not a busy loop)."""
        while True:
            await asyncio.sleep(self.settings.poll_interval)
            try:
                await self.refresh()
            except Exception:  # a bad scan must not stop serving what is loaded
                log.exception("repository scan failed")

    async def refresh(self) -> None:
        """Load new versions; versions no longer wanted take no new sessions and unload when unused."""
        added, removed = await asyncio.get_running_loop().run_in_executor(None, self.repo.scan)
        self._count_broken()
        for mv in added:
            self._add(mv)
        for mv in removed:
            self.repo.unload(mv)
            self.retired.add(mv)
            log.info("retired %s: no new sessions, %d live", mv.key, self.table.sessions_of(mv))
        if added or removed:
            for hook in self.on_changed:
                await hook()
        for mv in list(self.retired):
            if self.table.sessions_of(mv) == 0:
                self.retired.discard(mv)
                b = self.batchers.pop(mv, None)
                self.table.pools.pop(mv, None)
                if b is not None:
                    await b.stop()
                log.info("unloaded %s", mv.key)

    def _count_broken(self) -> None:
        if self.metrics is not None:
            self.metrics.broken_versions(len(self.repo.failed))

    def _add(self, mv: ModelVersion) -> None:
        s = self.settings
        b = Batcher(mv, self.table.pool(mv), self.table, s.max_batch, s.max_wait_ms / 1000.0, self.metrics,
                    s.inline_rows, s.feed_slice_ms / 1000.0, self.on_stepped, s.gen_slice_ms / 1000.0)
        b.start()
        self.batchers[mv] = b

    # -- lookups ------------------------------------------------------------------------------------------
    def list(self) -> list[tuple[ModelVersion, bool]]:
        """Every loaded version with whether it is the latest (the default) of its model."""
        if self.repo is None:
            return []
        return [(mv, self.repo.get(mv.name) is mv) for mv in self.repo.all()]

    def is_latest(self, mv: ModelVersion) -> bool:
        """Whether this version is the one new sessions of its model get (the default)."""
        return self.repo is not None and self.repo.get(mv.name) is mv

    def get(self, name: str, version: int = 0) -> ModelVersion:
        """A loaded model version (0 = latest); NOT_FOUND naming what exists."""
        mv = self.repo.get(name, version) if self.repo else None
        if mv is not None:
            return mv
        if not name:
            raise InvalidArgument("no model named: set the model name")
        have = ", ".join(f"{m.name}:{m.version}" for m, _ in self.list()[:20]) or "none"
        what = f"model {shown(name)}" + (f" version {version}" if version else "")
        gone = next((m for m in self.retired if m.name == name and m.version == version), None)
        if gone is not None:
            raise NotFound(f"{what} was removed from the repository (or left the --serve-versions window): "
                           f"it takes no new sessions and only finishes its {self.table.sessions_of(gone)} "
                           f"live ones (loaded: {have})")
        raise NotFound(f"{what} is not loaded (loaded: {have})")

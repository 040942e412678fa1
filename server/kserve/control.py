"""Triton's model repository extension on the KServe endpoint: RepositoryIndex, RepositoryModelLoad and
RepositoryModelUnload over the live repository (server/models.py does the loading and unloading).

One repository per server: `repository_name` may be empty or the repository folder's name. Load takes no
parameters (rnnserve loads from its repository only: Triton's `config` and `file:` overrides are refused);
Unload accepts Triton's `unload_dependents` (there are no ensembles, so it changes nothing). What each mode
allows is models.py's: poll answers Load with a rescan and refuses Unload; explicit does both.
With authentication on, only the principals --control-principals names may call Load and Unload
(PERMISSION_DENIED otherwise); the index, like the statistics, is open to any authenticated caller.
"""
from __future__ import annotations

from typing import Any

import grpc

from .. import auth
from ..engine import Engine
from ..errors import InvalidArgument, NotFound, ServeError, shown

UNLOAD_PARAMETERS = ("unload_dependents",)


class PermissionDenied(ServeError):
    """An authenticated caller that may not change what is loaded."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Control:
    """The repository RPCs' request checks and answers, on the engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _may_control(self, what: str) -> None:
        """Without authentication everyone may (the anonymous principal); with it, --control-principals decides."""
        who = auth.current.get()
        if not who.how:
            return
        allowed = self.engine.settings.control_principal_names()
        if "*" not in allowed and who.name not in allowed:
            raise PermissionDenied(f"principal {who.name!r} may not call {what}: --control-principals "
                                   f"(RNNSERVE_CONTROL_PRINCIPALS) names who may")

    def _repository(self, name: str) -> None:
        """One repository: "" or its folder's name; NOT_FOUND otherwise."""
        mine = self.engine.repository_name()
        if name and name != mine:
            raise NotFound(f"unknown repository {shown(name)}: this server has one, {mine!r} (or leave it empty)")

    def index(self, req: Any, resp: Any) -> None:
        """Fill a RepositoryIndexResponse: every model folder, each version's state and reason."""
        self._repository(req.repository_name)
        for e in self.engine.repository_index(req.ready):
            m = resp.models.add()
            m.name, m.version, m.state, m.reason = e.name, e.version, e.state, e.reason

    async def load(self, req: Any) -> None:
        """Load (or reload) the named model; returns when it is served, raises why it is not."""
        self._may_control("RepositoryModelLoad")
        self._repository(req.repository_name)
        if req.parameters:
            raise InvalidArgument(f"RepositoryModelLoad parameters {', '.join(sorted(map(repr, req.parameters)))} "
                                  "are not supported: rnnserve loads models from its repository folder only")
        await self.engine.load_model(req.model_name)

    async def unload(self, req: Any) -> None:
        """Unload the named model (explicit model control)."""
        self._may_control("RepositoryModelUnload")
        self._repository(req.repository_name)
        unknown = sorted(set(req.parameters) - set(UNLOAD_PARAMETERS))
        if unknown:
            raise InvalidArgument(f"RepositoryModelUnload parameters {', '.join(map(repr, unknown))} are not "
                                  f"supported (known: {', '.join(UNLOAD_PARAMETERS)})")
        await self.engine.unload_model(req.model_name)

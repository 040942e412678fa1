"""Builds the grpc.aio server: the native and KServe servicers, health, reflection of both, metrics."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ..v1 import rnnserve_pb2 as pb
from ..v1 import rnnserve_pb2_grpc as pb_grpc
from . import auth, kserve
from .engine import Engine
from .interceptors import ErrorInterceptor
from .metrics import Metrics
from .metrics_http import MetricsEndpoint
from .servicer import RnnServeServicer
from .settings import Settings

log = logging.getLogger(__name__)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """One descriptor pool with every service this server answers, for grpc reflection.

    The KServe protos live in a private pool (they would clash with tritonclient's in the default
    one), so reflection gets a pool of its own holding both protocols, health and reflection."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(fd: FileDescriptor) -> None:
        if fd.name in added:
            return
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        pool.Add(proto)
        added.add(fd.name)

    for fd in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        add(fd)
    for proto in descriptor_pb2.FileDescriptorSet.FromString(kserve.descriptors.descriptor_set()).file:
        if proto.name not in added:
            pool.Add(proto)
            added.add(proto.name)
    return pool


class App:
    """One running server: engine, grpc.aio server, health, metrics endpoint."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.authenticator = auth.Authenticator.from_settings(settings)
        self.engine = Engine(settings, self.metrics)
        self.metrics.pending_from(lambda: [(mv, b.pending) for mv, b in self.engine.batchers.items()])
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.metrics_port = -1
        self.metrics_http: MetricsEndpoint | None = None
        self.services: list[str] = []
        self._engine_started = False

    async def start(self) -> None:
        """Load models, bind ports, start serving, mark health SERVING, write the port file."""
        s = self.settings
        await self.engine.start()
        self._engine_started = True
        opts = [("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_send_bytes),
                ("grpc.so_reuseport", 1 if s.reuse_port else 0)]
        self.server = grpc.aio.server(options=opts, interceptors=[ErrorInterceptor(self.metrics, self.authenticator)])
        pb_grpc.add_RnnServeServicer_to_server(RnnServeServicer(self.engine, self.metrics), self.server)
        self.server.add_generic_rpc_handlers(
            (kserve.handler(kserve.KServeServicer(self.engine, s, self.metrics)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        native, health = (pb.DESCRIPTOR.services_by_name["RnnServe"].full_name,
                          health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        self.services = [native, kserve.SERVICE, health]
        pool = reflection_pool()
        reflection.enable_server_reflection([*self.services, reflection.SERVICE_NAME], self.server, pool=pool)
        protocols = {native: "native", kserve.SERVICE: "kserve", health: "health", reflection.SERVICE_NAME: "reflection"}
        self.metrics.declare({name: (protocol, [m.name for m in pool.FindServiceByName(name).methods])
                              for name, protocol in protocols.items()})
        address = f"{s.host}:{s.port}"
        creds = server_credentials(s)
        try:
            self.port = self.server.add_secure_port(address, creds) if creds else self.server.add_insecure_port(address)
        except RuntimeError as e:  # grpc: "Failed to bind to address ..." (in use, or a host it cannot resolve)
            raise OSError(f"--host {s.host} --port {s.port}: cannot listen there ({e})") from None
        if self.port == 0:
            raise OSError(f"--host {s.host} --port {s.port}: cannot listen there")
        if not self.authenticator.enabled and not is_loopback(s.host):
            log.warning("listening on %s with no authentication: anyone who can reach this address can open, read "
                        "and close sessions; give --auth-tokens, --auth-jwks or --auth-mtls (see README, Security)",
                        s.host)
        await self.server.start()
        if s.metrics_port >= 0:
            self.metrics_http = MetricsEndpoint(self.metrics.registry,
                                                authorize=self._metrics_authorized if s.metrics_auth else None)
            try:
                self.metrics_port = await self.metrics_http.start(s.metrics_host, s.metrics_port)
            except OSError as e:
                raise OSError(f"--metrics-host {s.metrics_host} --metrics-port {s.metrics_port}: cannot listen "
                              f"there ({e.strerror or e})") from None
        await self._set_health(self.engine.ready)
        self.engine.on_models_changed.append(lambda: self._set_health(self.engine.ready))
        log.info("serving on %s:%d (metrics %s), models: %s", s.host, self.port,
                 self.metrics_port if self.metrics_port >= 0 else "off",
                 ", ".join(mv.key for mv, _ in self.engine.list_models()) or "none")
        if s.port_file:
            write_port_file(s.port_file, self.port, self.metrics_port)

    async def abandon(self) -> None:
        """After a failed start: stop what did start (the gRPC server, the store's claim, the models)."""
        if self.server is not None:
            await self.server.stop(None)
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        await self.engine.stop(started=self._engine_started)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.services]:
            await self.health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new work, let generations end within grace, then stop the server."""
        grace = self.settings.grace if grace is None else grace
        loop = asyncio.get_running_loop()
        end = loop.time() + grace
        await self._set_health(False)
        if self.server is not None:
            # A quarter of the grace (at most 0.5 s) is kept back from the generations, so those cut at
            # their deadline still get their last chunk (finish_reason CANCELLED) out before the calls end.
            await self.engine.drain(grace - min(0.5, grace / 4))
            await self.server.stop(max(0.0, end - loop.time()))  # cuts calls still open at the deadline
        await self.engine.stop()
        if self.metrics_http is not None:
            await self.metrics_http.stop()
        log.info("stopped")

    def _metrics_authorized(self, header: str | None) -> bool:
        """--metrics-auth: /metrics takes the credentials a gRPC call takes (a bearer token)."""
        try:
            self.authenticator.authenticate([("authorization", header)] if header else [], {})
        except auth.Unauthenticated:
            return False
        return True


def server_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """TLS (and mTLS with --tls-client-ca) from PEM files, or None for plaintext."""
    if s.tls_cert is None:
        return None
    ca = Path(s.tls_client_ca).read_bytes() if s.tls_client_ca else None
    return grpc.ssl_server_credentials([(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                                       root_certificates=ca, require_client_auth=ca is not None)


def is_loopback(host: str) -> bool:
    """Whether an address only this machine can reach ("localhost", 127.0.0.0/8, ::1)."""
    import ipaddress

    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def write_port_file(path: Path, port: int, metrics_port: int, **more: object) -> None:
    """Write {"port", "metrics_port", ...} atomically (temp file then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port, **more}))
    os.replace(tmp, path)

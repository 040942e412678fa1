"""Server settings: parsed once from flags (each with an env var) into a frozen dataclass."""
from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ENV_PREFIX = "RNNSERVE_"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
MAX_BATCH_TURNS = 1000  # a turn costs microseconds; more would only add latency
# --auth-open names -> the gRPC method paths (prefixes) they open to callers without credentials
OPEN_SERVICES = {"health": ("/grpc.health.v1.Health/",),
                 "reflection": ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/"),
                 "kserve-health": ("/inference.GRPCInferenceService/ServerLive",
                                   "/inference.GRPCInferenceService/ServerReady")}


@dataclass(frozen=True)
class Settings:
    """Everything the server reads from its command line or environment."""

    models: Path = Path("models")
    host: str = "127.0.0.1"  # loopback unless told: the container sets 0.0.0.0
    port: int = 8001
    metrics_port: int = 8002  # 0 = ephemeral, -1 = off
    port_file: Path | None = None
    device: str = "auto"  # auto | cpu | cuda
    max_batch: int = 256
    max_wait_ms: float = 0.0  # 0: batch what piled up while the previous call ran
    batch_turns: int = 40  # most loop turns a lone queued step waits for calls already arrived (0 = none)
    max_sessions: int = 100_000
    idle_timeout: float = 1800.0  # seconds, 0 = never
    max_generate_tokens: int = 4096
    max_message_bytes: int = 4 * 1024 * 1024
    grace: float = 10.0
    poll_interval: float = 2.0  # 0 = do not watch the repository
    serve_versions: int = 1  # 0 = all
    model_control: str = "poll"  # poll (load everything, rescan) | explicit (--load-model, then the repository RPCs)
    load_models: str = ""  # explicit mode: models loaded at start, comma-separated ("*" = all)
    control_principals: str = ""  # with authentication: who may load/unload models ("*" = any; "" = nobody)
    chunk_tokens: int = 32  # fewer, larger messages: gRPC's per-message cost bounds tokens/s
    ort_threads: int = 1  # onnxruntime intra-op threads per session; 0 = its default (one per core)
    ort_gen_threads: int = 0  # the same for step batches with generating rows (0 = one per core)
    inline_rows: int = 64  # feed-only step batches up to this size run on the event loop; 0 = never
    feed_slice_ms: float = 2.0  # target onnxruntime time of one iteration's share of multi-token feeds
    gen_slice_ms: float = 12.0  # longest generation call (K tokens for every generating row)
    max_feed_tokens: int = 262_144  # most tokens of one feed or KServe request
    max_inflight_tokens: int = 4_194_304  # most tokens of all feeds queued or running at once
    prefix_cache_mb: float = 64.0  # memory for the exact prefix-state cache (0 = off)
    session_store: str = "sqlite"  # memory | sqlite (a file in state_dir) | redis://HOST:PORT/DB
    state_dir: Path = Path("rnnserve-state")  # the sqlite store's folder
    state_sync: str = "200ms"  # step | detach | an interval (200ms: a kill -9 loses at most 0.2 s of steps)
    replica_id: str = ""  # this process's id in a shared store ("" = from the state folder, or random)
    auth_tokens: Path | None = None  # bearer tokens file (sha256 digests, principals, limits)
    auth_jwks: Path | None = None  # JWKS file or PEM public key verifying JWT bearer tokens
    auth_issuer: str = ""  # required `iss` of JWTs ("" = not checked)
    auth_audience: str = ""  # required `aud` of JWTs ("" = not checked)
    auth_principal_claim: str = "sub"  # the JWT claim naming the principal
    auth_mtls: bool = False  # a verified client certificate's common name is the principal
    auth_open: str = "health,reflection"  # services callable without credentials (also: kserve-health)
    tls_cert: Path | None = None  # server certificate chain (PEM): serve TLS
    tls_key: Path | None = None  # its private key (PEM)
    tls_client_ca: Path | None = None  # CA bundle (PEM): require and verify client certificates (mTLS)
    quota_sessions: int = 0  # default per-principal limits (0 = none): live sessions ...
    quota_tokens_per_s: float = 0.0  # ... feed and generated tokens per second ...
    quota_generations: int = 0  # ... generations running at once
    metrics_host: str = "127.0.0.1"  # the metrics endpoint's own bind address
    metrics_auth: bool = False  # /metrics needs the same credentials as gRPC calls
    workers: int = 1  # server processes sharing the port (and their sessions)
    reuse_port: bool = False  # bind with SO_REUSEPORT (what --workers does for its workers)
    event_loop: str = "auto"  # auto (uvloop when installed) | uvloop | asyncio
    log_level: str = "INFO"

    def open_services_names(self) -> list[str]:
        """--auth-open as a list of its names."""
        return [n.strip() for n in self.auth_open.split(",") if n.strip()]

    def open_methods(self) -> tuple[str, ...]:
        """The method paths (prefixes) callable without credentials."""
        return tuple(m for n in self.open_services_names() for m in OPEN_SERVICES.get(n, ()))

    def control_principal_names(self) -> list[str]:
        """--control-principals as a list of principal names (["*"] = any authenticated caller)."""
        return [n.strip() for n in self.control_principals.split(",") if n.strip()]

    def load_model_names(self) -> list[str]:
        """--load-model / RNNSERVE_LOAD_MODELS as a list of names (["*"] = every model)."""
        return [n.strip() for n in self.load_models.split(",") if n.strip()]

    @property
    def max_send_bytes(self) -> int:
        """The largest answer the server sends (gRPC's send limit): answers that would be larger are refused."""
        return max(self.max_message_bytes, 64 * 1024 * 1024)


# flag, dest, type, help
_FLAGS: list[tuple[str, str, type, str]] = [
    ("--models", "models", Path, "model repository folder"),
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "gRPC port (0 = ephemeral)"),
    ("--metrics-port", "metrics_port", int, "Prometheus HTTP port (0 = ephemeral, -1 = off)"),
    ("--port-file", "port_file", Path, "write {\"port\", \"metrics_port\"} JSON here once serving"),
    ("--device", "device", str, "auto | cpu | cuda"),
    ("--max-batch", "max_batch", int, "largest batch of one onnxruntime call"),
    ("--max-wait-ms", "max_wait_ms", float, "longest wait for a batch to fill (ms)"),
    ("--batch-turns", "batch_turns", int,
     ("most event-loop turns a lone queued step waits, while several sessions step, for calls already arrived to "
      "join its batch: 3 per session stepping in the last 50 ms, up to this (0 = none)")),
    ("--max-sessions", "max_sessions", int, "cap on live sessions"),
    ("--idle-timeout", "idle_timeout", float, "seconds before an idle session expires (0 = never)"),
    ("--max-generate-tokens", "max_generate_tokens", int, "largest max_tokens of one generate"),
    ("--max-message-bytes", "max_message_bytes", int, "largest request message"),
    ("--grace", "grace", float, "seconds to finish in-flight work on shutdown"),
    ("--poll-interval", "poll_interval", float, "seconds between repository scans (0 = off)"),
    ("--serve-versions", "serve_versions", str, "'all' or N = latest N versions per model"),
    ("--model-control", "model_control", str,
     ("poll: load every model, rescan every --poll-interval; explicit: load the --load-model names, then only "
      "on RepositoryModelLoad/Unload")),
    ("--control-principals", "control_principals", str,
     ("with authentication on: principals allowed to call RepositoryModelLoad/Unload, comma-separated ('*' = "
      "any authenticated caller; empty = nobody)")),
    ("--chunk-tokens", "chunk_tokens", int, "default tokens per streamed generation chunk"),
    ("--ort-threads", "ort_threads", int, "onnxruntime intra-op threads per model (0 = one per core)"),
    ("--ort-gen-threads", "ort_gen_threads", int, "the same for batches with generating rows"),
    ("--inline-rows", "inline_rows", int, "feed-only batches up to this many rows skip the onnxruntime thread"),
    ("--feed-slice-ms", "feed_slice_ms", float,
     "long feeds run in slices of about this many ms of onnxruntime time, between other sessions' steps"),
    ("--gen-slice-ms", "gen_slice_ms", float,
     "longest generate.onnx call: K tokens for every generating row, within --chunk-tokens"),
    ("--max-feed-tokens", "max_feed_tokens", int, "most tokens in one feed or KServe request"),
    ("--max-inflight-tokens", "max_inflight_tokens", int, "most tokens of all feeds queued or running at once"),
    ("--prefix-cache-mb", "prefix_cache_mb", float, "memory for the states after common prompts (0 = off)"),
    ("--session-store", "session_store", str,
     "where sessions live between requests: memory, sqlite (a file in --state-dir) or redis://HOST:PORT/DB"),
    ("--state-dir", "state_dir", Path, "folder of the sqlite session store"),
    ("--state-sync", "state_sync", str, "when sessions are written: step, detach, or an interval such as 200ms"),
    ("--replica-id", "replica_id", str, "this server's id in a shared store (default: random per process)"),
    ("--auth-tokens", "auth_tokens", Path, "bearer tokens file: sha256 digests, principals, limits (JSON)"),
    ("--auth-jwks", "auth_jwks", Path, "JWKS file (or PEM public key) that verifies JWT bearer tokens"),
    ("--auth-issuer", "auth_issuer", str, "required JWT issuer (iss)"),
    ("--auth-audience", "auth_audience", str, "required JWT audience (aud)"),
    ("--auth-principal-claim", "auth_principal_claim", str, "JWT claim naming the principal"),
    ("--auth-mtls", "auth_mtls", lambda v: _yes(v, "--auth-mtls"), "1: a client certificate's CN is the principal"),
    ("--auth-open", "auth_open", str, "services open without credentials: health, reflection, kserve-health"),
    ("--tls-cert", "tls_cert", Path, "server certificate chain (PEM): serve gRPC over TLS"),
    ("--tls-key", "tls_key", Path, "the certificate's private key (PEM)"),
    ("--tls-client-ca", "tls_client_ca", Path, "CA bundle (PEM): require verified client certificates (mTLS)"),
    ("--quota-sessions", "quota_sessions", int, "default live sessions per principal (0 = no limit)"),
    ("--quota-tokens-per-s", "quota_tokens_per_s", float, "default fed+generated tokens/s per principal (0 = none)"),
    ("--quota-generations", "quota_generations", int, "default generations at once per principal (0 = none)"),
    ("--metrics-host", "metrics_host", str, "address of the metrics endpoint"),
    ("--metrics-auth", "metrics_auth", lambda v: _yes(v, "--metrics-auth"), "1: /metrics needs credentials"),
    ("--workers", "workers", int, "server processes on this port, sharing sessions (more cores)"),
    ("--reuse-port", "reuse_port", lambda v: _yes(v, "--reuse-port"),
     "1: bind with SO_REUSEPORT so several processes share the port"),
    ("--event-loop", "event_loop", str,
     "auto (uvloop when installed, else asyncio's own) | uvloop | asyncio: the loop gRPC and the batcher run on"),
    ("--log-level", "log_level", str, "DEBUG | INFO | WARNING | ERROR"),
]


def _yes(value: str, flag: str) -> bool:
    """1/0, true/false, yes/no, on/off."""
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{flag} must be 1 or 0 (true/false), got {value!r}")


def _env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def _versions(value: str) -> int:
    """'all' -> 0, N -> N (>= 1)."""
    if str(value).strip().lower() == "all":
        return 0
    n = int(value)
    if n < 1:
        raise ValueError(f"--serve-versions must be 'all' or >= 1, got {value!r}")
    return n


def parse_policy(text: str) -> float | str:
    """--state-sync: 'step', 'detach', or an interval like '250ms' / '2s' (seconds, as a float)."""
    t = text.strip().lower()
    if t in ("step", "detach"):
        return t
    try:
        if t.endswith("ms"):
            value = float(t[:-2]) / 1000.0
        elif t.endswith("s"):
            value = float(t[:-1])
        else:
            raise ValueError(t)
    except ValueError:
        raise ValueError(f"--state-sync must be step, detach or an interval such as 200ms or 2s, got {text!r}") from None
    if not 0 < value < 3600:
        raise ValueError(f"--state-sync interval must be between 0 and 1 hour, got {text!r}")
    return value




def _control_problems(s: Settings) -> list[str]:
    """--model-control and --load-model: Triton's rules (a '*' alone; names only in explicit mode)."""
    names = s.load_model_names()
    if s.model_control not in ("poll", "explicit"):
        return [f"--model-control must be poll or explicit, got {s.model_control!r}"]
    problems = []
    if names and s.model_control != "explicit":
        problems.append("--load-model (RNNSERVE_LOAD_MODELS) needs --model-control explicit: in poll mode every "
                        "model is loaded")
    if "*" in names and len(names) > 1:
        problems.append("--load-model '*' loads every model: give it alone, not with other names")
    bad = [n for n in names if n != "*" and (n.startswith(".") or any(c in n for c in "/\\\0"))]
    if bad:
        problems.append(f"--load-model takes model folder names, not {', '.join(map(repr, bad))}")
    if s.model_control == "explicit" and s.workers > 1:
        problems.append("--model-control explicit needs one process: with --workers each worker would load and "
                        "unload on its own")
    return problems


def parse(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Settings:
    """Flags override env vars (RNNSERVE_<NAME>), which override the defaults."""
    defaults = Settings()
    ap = argparse.ArgumentParser(prog="rnn-serve", description="Serve recurrent models over gRPC.")
    for flag, dest, typ, help_ in _FLAGS:
        env = _env_name(dest)
        default = getattr(defaults, dest)
        if dest == "serve_versions":
            default = "all" if default == 0 else str(default)
        ap.add_argument(flag, dest=dest, type=typ, default=None, help=f"{help_} (env {env}; default {default})")
    ap.add_argument("--load-model", dest="load_models", action="append", default=None, metavar="NAME",
                    help=f"with --model-control explicit: a model to load at start, repeatable; '*' = all "
                         f"(env {_env_name('load_models')}, comma-separated; default none)")
    ns = ap.parse_args(list(argv) if argv is not None else None)
    values: dict[str, object] = {}
    if ns.load_models is not None:
        values["load_models"] = ",".join(ns.load_models)
    elif environ.get(_env_name("load_models")):
        values["load_models"] = environ[_env_name("load_models")]
    for _flag, dest, typ, _help in _FLAGS:
        raw = getattr(ns, dest)
        if raw is None and _env_name(dest) in environ and environ[_env_name(dest)] != "":
            try:
                raw = typ(environ[_env_name(dest)])
            except ValueError as e:
                ap.error(f"{_env_name(dest)}={environ[_env_name(dest)]!r}: {e}")
        if raw is None:
            continue
        if dest == "serve_versions":
            try:
                raw = _versions(raw)
            except ValueError as e:
                ap.error(str(e))
        values[dest] = raw
    s = Settings(**values)  # type: ignore[arg-type]
    problems = []
    for name in ("max_wait_ms", "idle_timeout", "grace", "poll_interval", "feed_slice_ms", "prefix_cache_mb",
                 "gen_slice_ms"):
        if not math.isfinite(getattr(s, name)):
            problems.append(f"--{name.replace('_', '-')} must be a finite number, got {getattr(s, name)}")
    if s.session_store not in ("memory", "sqlite") and not s.session_store.startswith(
            ("redis://", "rediss://", "unix://")):
        problems.append(f"--session-store must be memory, sqlite or redis://HOST:PORT/DB, got {s.session_store!r}")
    try:
        parse_policy(s.state_sync)
    except ValueError as e:
        problems.append(str(e))
    problems += _control_problems(s)
    if s.event_loop not in EVENT_LOOPS:
        problems.append(f"--event-loop must be auto, uvloop or asyncio, got {s.event_loop!r}")
    if s.device not in ("auto", "cpu", "cuda"):
        problems.append(f"--device must be auto, cpu or cuda, got {s.device!r}")
    for name in ("max_batch", "max_sessions", "max_generate_tokens", "max_message_bytes", "chunk_tokens",
                 "max_feed_tokens", "max_inflight_tokens", "workers"):
        if getattr(s, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    for name in ("max_wait_ms", "idle_timeout", "grace", "poll_interval", "ort_threads", "ort_gen_threads",
                 "inline_rows"):
        if getattr(s, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    if not 0 <= s.batch_turns <= MAX_BATCH_TURNS:
        problems.append(f"--batch-turns must be between 0 and {MAX_BATCH_TURNS}, got {s.batch_turns}")
    if (s.tls_cert is None) != (s.tls_key is None):
        problems.append("--tls-cert and --tls-key go together")
    if (s.tls_client_ca or s.auth_mtls) and s.tls_cert is None:
        problems.append("--tls-client-ca and --auth-mtls need TLS: give --tls-cert and --tls-key")
    if s.auth_mtls and s.tls_client_ca is None:
        problems.append("--auth-mtls needs --tls-client-ca (the CA that signs client certificates)")
    for name in ("auth_tokens", "auth_jwks", "tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(s, name)
        if path is not None and not Path(path).is_file():
            problems.append(f"--{name.replace('_', '-')} {path}: no such file")
    unknown = set(s.open_services_names()) - set(OPEN_SERVICES)
    if unknown:
        problems.append(f"--auth-open knows {', '.join(OPEN_SERVICES)}, not {', '.join(sorted(unknown))}")
    for name in ("quota_sessions", "quota_tokens_per_s", "quota_generations", "prefix_cache_mb"):
        if not getattr(s, name) >= 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    if not s.gen_slice_ms > 0:
        problems.append(f"--gen-slice-ms must be > 0, got {s.gen_slice_ms}")
    if not s.feed_slice_ms > 0:
        problems.append(f"--feed-slice-ms must be > 0, got {s.feed_slice_ms}")
    if not 0 <= s.port <= 65535:
        problems.append(f"--port must be 0 (a free port) or a port up to 65535, got {s.port}")
    if not -1 <= s.metrics_port <= 65535:
        problems.append(f"--metrics-port must be -1 (off), 0 (a free port) or a port up to 65535, got {s.metrics_port}")
    if problems:
        ap.error("; ".join(problems))
    return s

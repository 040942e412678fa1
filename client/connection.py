"""How a client reaches a server: TLS credentials (plaintext, TLS or mTLS), channel options, the metadata every
call carries (a bearer token), the target's form, and the connection flags the CLIs share."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

# Large enough for a full-logits OUTPUT_ALL feed of a long chunk; the server enforces its own limit.
DEFAULT_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)
AUTHORIZATION = "authorization"  # the bearer token's metadata key: `authorization: Bearer <token>`

log = logging.getLogger(__name__)

Pem = bytes | str | os.PathLike
"""PEM data (bytes, or a str holding a "-----BEGIN" line) or the path of a PEM file."""


def read_pem(source: Pem, what: str, kind: str = "CERTIFICATE") -> bytes:
    """PEM bytes holding a `kind` block ("CERTIFICATE", "PRIVATE KEY") from data or a file; ValueError
    naming `what` (an argument or flag) and the file."""
    if isinstance(source, bytes):
        data, where = source, what
    elif isinstance(source, str) and "-----BEGIN" in source:
        data, where = source.encode("ascii", "replace"), what
    else:
        path = Path(source)
        where = f"{what} {path}"
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{where}: cannot read ({e.strerror or e})") from None
    if f"{kind}-----".encode() not in data:
        raise ValueError(f"{where}: holds no PEM {kind}")
    return data


def bearer(token: str) -> str:
    """The `authorization` value for a token; ValueError (never showing the token) if it cannot be sent."""
    token = token.strip()
    if not token or not all(" " < ch <= "~" for ch in token):
        raise ValueError("token: must be non-empty printable ASCII without spaces")
    return f"Bearer {token}"


def _addresses(target: str) -> list[tuple[str, str]]:
    """(host, port) of each address of a host:port gRPC target (port "" when not given); [] for a socket."""
    if target.startswith(("unix:", "unix-abstract:", "vsock:")):
        return []
    address = target.split("///", 1)[-1]  # dns:///host:port
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        address = address.removeprefix(scheme)
    out = []
    for one in address.split(","):
        if one.startswith("["):  # [::1]:8001
            out.append((one[1:one.find("]")], one[one.find("]") + 1:].removeprefix(":")))
        elif one.count(":") == 1:  # host:port
            out.append(tuple(one.split(":")))
        else:  # a bare host or IPv6 address
            out.append((one, ""))
    return out


def check_target(target: str) -> None:
    """ValueError for a target whose port is not 1-65535 (gRPC would quietly take 70000 as 4464)."""
    for _, port in _addresses(target):
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"target {target}: the port must be a number from 1 to 65535, got {port!r}")


def is_loopback(target: str) -> bool:
    """Whether a gRPC target only reaches this machine (localhost, 127.0.0.0/8, ::1, a unix socket)."""
    addresses = _addresses(target)
    if not addresses:
        return True
    host = addresses[0][0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Connection:
    """How a client reaches a server: TLS credentials (None = plaintext), channel options, call metadata."""

    credentials: grpc.ChannelCredentials | None = None
    options: tuple[tuple[str, Any], ...] = DEFAULT_OPTIONS
    metadata: tuple[tuple[str, str], ...] = ()

    def channel(self, module: Any, target: str) -> Any:
        """A channel to `target` made by `module` (grpc or grpc.aio): secure when there are credentials."""
        if self.credentials is None:
            return module.insecure_channel(target, options=self.options)
        return module.secure_channel(target, self.credentials, options=self.options)


def connection(target: str, metadata: Sequence[tuple[str, str]] | None = None, *, token: str | None = None,
               tls: bool = False, ca: Pem | None = None, cert: Pem | None = None, key: Pem | None = None,
               server_name: str | None = None) -> Connection:
    """The Connection for these settings: TLS with `tls` or any of ca/cert/key/server_name (ca None = the
    system roots; cert and key = a client certificate for mTLS; server_name = the name the server's
    certificate is checked against), and `authorization: Bearer <token>` on every call with a token."""
    check_target(target)
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together: give both for a client certificate, or neither")
    calls = [(k, v) for k, v in (metadata or ()) if not (token and k.lower() == AUTHORIZATION)]
    if token:
        calls.append((AUTHORIZATION, bearer(token)))
    if not (tls or ca is not None or cert is not None or server_name):
        if token and not is_loopback(target):
            log.warning("sending a bearer token to %s without TLS: anyone on the path can read it", target)
        return Connection(None, DEFAULT_OPTIONS, tuple(calls))
    creds = grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else read_pem(ca, "ca"),
        private_key=None if key is None else read_pem(key, "key", "PRIVATE KEY"),
        certificate_chain=None if cert is None else read_pem(cert, "cert"))
    options = DEFAULT_OPTIONS + ((("grpc.ssl_target_name_override", server_name),) if server_name else ())
    return Connection(creds, options, tuple(calls))


def refusal_hint(details: str, settings: Mapping[str, Any]) -> str:
    """A guess at why a server closed the connection at once, from the client's settings ("" if none)."""
    if "Socket closed" not in details:
        return ""
    if not any(settings.get(k) for k in ("tls", "ca", "cert", "key", "server_name")):
        return "; if the server speaks TLS, give --tls or --tls-ca"
    if not settings.get("cert"):
        return "; if the server wants a client certificate (mTLS), give --tls-cert and --tls-key"
    return ""


def client_connection(target: str, channel: object | None, metadata: Sequence[tuple[str, str]] | None,
                      **settings: Any) -> Connection:
    """A client's Connection; with its own `channel` only the metadata applies (TLS settings are an error)."""
    if channel is not None and any(v for k, v in settings.items() if k != "token"):
        raise ValueError("tls, ca, cert, key and server_name make the channel: not with channel=")
    return connection(target, metadata, **settings)


# -- the command lines' connection flags ----------------------------------------------------------------
# flag, its environment variable's suffix (after the CLI's prefix), metavar ("" = a switch), what, default
FLAGS = (("--token", "TOKEN", "TOKEN",
          "bearer token for `authorization: Bearer` (the variable keeps it out of ps)", "none"),
         ("--tls", "TLS", "", "use TLS, trusting the system's CA roots (the other --tls-* flags imply it)",
          "plaintext"),
         ("--tls-ca", "TLS_CA", "FILE", "CA bundle (PEM) the server's certificate must chain to",
          "the system roots"),
         ("--tls-cert", "TLS_CLIENT_CERT", "FILE", "client certificate chain (PEM) for mTLS, with --tls-key",
          "none"),
         ("--tls-key", "TLS_CLIENT_KEY", "FILE", "the client certificate's private key (PEM)", "none"),
         ("--tls-server-name", "TLS_SERVER_NAME", "NAME", "name the server's certificate must carry",
          "the target's host"))
_YES, _NO = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def add_connection_flags(p: argparse.ArgumentParser, env_prefix: str) -> None:
    """--token and the --tls flags, each read from env_prefix + its suffix when not given."""
    group = p.add_argument_group("credentials and TLS")
    for flag, suffix, metavar, what, default in FLAGS:
        env = f"{env_prefix}{suffix}{'' if metavar else '=1'}"
        group.add_argument(flag, default=None, help=f"{what} (env {env}, default {default})",
                           **({"metavar": metavar} if metavar else {"action": "store_true"}))


def connection_settings(args: argparse.Namespace, env_prefix: str,
                        environ: Mapping[str, str]) -> dict[str, Any]:
    """Client keyword arguments from the flags, else the environment, with the PEM files read (ValueError
    naming the flag, the variable when the value came from one, and the file)."""
    out: dict[str, Any] = {}
    for flag, suffix, metavar, _, _ in FLAGS:
        name = flag[2:].replace("-", "_")
        value, source = getattr(args, name), flag
        if value is None and environ.get(env_prefix + suffix):
            value, source = environ[env_prefix + suffix], f"{flag} (from {env_prefix}{suffix})"
        if not metavar:  # --tls
            text = "1" if value is True else str(value or "0").strip().lower()
            if text not in _YES + _NO:
                raise ValueError(f"{source} must be 1 or 0, got {value!r}")
            out[name] = text in _YES
        elif metavar == "FILE" and value:
            out[name.removeprefix("tls_")] = read_pem(Path(value), source,
                                                      "PRIVATE KEY" if flag == "--tls-key" else "CERTIFICATE")
        elif value:
            out[name.removeprefix("tls_")] = value
    if ("cert" in out) != ("key" in out):
        raise ValueError("--tls-cert and --tls-key go together: give both for a client certificate, "
                         "or neither")
    return out

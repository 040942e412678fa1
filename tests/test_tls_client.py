"""TLS, mTLS and bearer tokens from the client side: the library, rnn-client and rnn-health against real
rnn-serve processes on 127.0.0.1, with certificates made at test time (trustme).

Two servers run for the module: `tls` (TLS, --auth-tokens) and `mtls` (TLS, --tls-client-ca, --auth-mtls 1
and --auth-tokens). The client certificate's common name is "alice"; the tokens file knows alice and bob.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from rnnserve.client import AsyncClient, Client, RnnServeError
from rnnserve.server.auth import digest

trustme = pytest.importorskip("trustme")

BIN = Path(sys.executable).parent
TOKENS = {"alice": "alice-7Qf2-secret", "bob": "bob-Xk93-secret"}
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class Pki:
    """PEM files: a test CA, a server certificate (127.0.0.1, localhost), a client one (CN alice)."""

    ca: Path
    server_chain: Path
    server_key: Path
    client_chain: Path
    client_key: Path


@dataclass(frozen=True)
class Servers:
    """The two servers' targets."""

    tls: str
    mtls: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A fresh CA and the certificates it signs, as files."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("alice.clients.test", common_name="alice")
    paths = Pki(*(folder / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(paths.ca))
    for leaf, chain, key in ((server, paths.server_chain, paths.server_key),
                             (client, paths.client_chain, paths.client_key)):
        chain.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
    return paths


def _start(tiny_repo: Path, work: Path, *flags: str) -> tuple[subprocess.Popen, Path]:
    """rnn-serve on the tiny repository, ephemeral port, in-memory sessions; (process, its port file)."""
    work.mkdir()
    port_file = work / "port.json"
    with (work / "server.log").open("wb") as log:
        proc = subprocess.Popen([str(BIN / "rnn-serve"), "--models", str(tiny_repo), "--host", "127.0.0.1",
                                 "--port", "0", "--metrics-port", "-1", "--poll-interval", "0",
                                 "--session-store", "memory", "--state-dir", str(work / "state"),
                                 "--port-file", str(port_file), *flags],
                                stdout=log, stderr=subprocess.STDOUT)
    return proc, port_file


def _port(proc: subprocess.Popen, port_file: Path, deadline: float) -> int:
    """The port once the server serves (it writes the port file then)."""
    while not port_file.exists():
        assert proc.poll() is None, (port_file.parent / "server.log").read_text()
        assert time.monotonic() < deadline, "rnn-serve did not start within 60 s"
        time.sleep(0.05)
    return json.loads(port_file.read_text())["port"]


@pytest.fixture(scope="module")
def servers(tiny_repo: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    """Both servers, started side by side; stopped with SIGTERM, each must exit 0."""
    work = tmp_path_factory.mktemp("tls-servers")
    tokens = work / "tokens.json"
    tokens.write_text(json.dumps({"tokens": [{"principal": who, "sha256": digest(token)}
                                             for who, token in TOKENS.items()]}))
    tls = ("--tls-cert", str(pki.server_chain), "--tls-key", str(pki.server_key),
           "--auth-tokens", str(tokens))
    procs = [_start(tiny_repo, work / "tls", *tls),
             _start(tiny_repo, work / "mtls", *tls, "--tls-client-ca", str(pki.ca), "--auth-mtls", "1")]
    try:
        deadline = time.monotonic() + 60
        yield Servers(*(f"127.0.0.1:{_port(proc, pf, deadline)}" for proc, pf in procs))
    finally:
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, pf in procs:
            assert proc.wait(timeout=30) == 0, (pf.parent / "server.log").read_text()


def _code(fn: Callable[..., object], *args: object) -> RnnServeError:
    """The RnnServeError fn(*args) raises."""
    with pytest.raises(RnnServeError) as exc:
        fn(*args)
    return exc.value


def _round_trip(c: Client) -> str:
    """Open, feed, generate and get_state over one session stream, then a unary step; the text generated."""
    assert "tiny" in {m.name for m in c.list_models()}
    with c.session("tiny") as s:
        assert s.feed("All:\n", output="none").steps == 5
        text = "".join(s.generate(12, temperature=0, chunk_tokens=4))
        state = c.get_state(s.session_id)
        assert state.steps == 17 and len(state.state) > 0
    opened = c.open_session("tiny")
    assert c.step(opened.session_id, "Speak", output="none").steps == 5
    c.close_session(opened.session_id)
    return text


def test_sync_and_async_clients_over_tls(servers: Servers, pki: Pki) -> None:
    with Client(servers.tls, ca=pki.ca, token=TOKENS["alice"]) as c:
        text = _round_trip(c)
    assert len(text) == 12

    async def go() -> str:
        # the CA as bytes, the certificate checked against the name localhost rather than the address
        async with AsyncClient(servers.tls, ca=pki.ca.read_bytes(), token=TOKENS["bob"],
                               server_name="localhost") as c:
            assert "tiny" in {m.name for m in await c.list_models()}
            s = await c.session("tiny")
            assert (await s.feed("All:\n", output="none")).steps == 5
            out = "".join([t async for t in s.generate(12, temperature=0, chunk_tokens=4)])
            assert (await c.get_state(s.session_id)).steps == 17
            s.detach()
            again = await c.resume(s.session_id)  # a second stream carries the token too
            await again.close()
            opened = await c.open_session("tiny")
            assert (await c.step(opened.session_id, "Speak", output="none")).steps == 5
            await c.close_session(opened.session_id)
            return out
    assert asyncio.run(go()) == text  # greedy: the same model gives the same text either way


def test_tls_refusals_are_prompt_and_unavailable(servers: Servers, pki: Pki) -> None:
    for kwargs in ({},  # plaintext against TLS
                   {"tls": True},  # the system roots do not know the test CA
                   {"ca": pki.ca, "server_name": "elsewhere.test"}):  # not a name the certificate carries
        began = time.monotonic()
        with Client(servers.tls, timeout=10, token=TOKENS["alice"], **kwargs) as c:
            assert _code(c.list_models).code == grpc.StatusCode.UNAVAILABLE, kwargs
        assert time.monotonic() - began < 5, kwargs


def test_tokens_missing_wrong_and_right(servers: Servers, pki: Pki) -> None:
    messages = []
    for token in (None, "not-a-token", TOKENS["alice"][:-1]):
        with Client(servers.tls, ca=pki.ca, token=token) as c:
            for err in (_code(c.list_models), _code(c.session, "tiny"), _code(c.get_state, "some-id")):
                assert err.code == UNAUTH, (token, err)
                messages.append(err.message)
    assert len(set(messages)) == 1, messages  # one message: nothing tells a missing token from a wrong one
    assert not any(t in messages[0] for t in ("not-a-token", TOKENS["alice"][:-1]))
    with Client(servers.tls, ca=pki.ca, token=TOKENS["alice"]) as c:
        assert c.list_models()


def test_mtls_needs_a_client_certificate_and_its_cn_is_the_principal(servers: Servers, pki: Pki) -> None:
    with Client(servers.mtls, timeout=10, ca=pki.ca) as c:
        began = time.monotonic()
        assert _code(c.list_models).code == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        assert time.monotonic() - began < 5
    cert = {"ca": pki.ca, "cert": pki.client_chain, "key": pki.client_key}
    with Client(servers.mtls, **cert) as alice, Client(servers.mtls, token=TOKENS["bob"], **cert) as bob, \
            Client(servers.mtls, token=TOKENS["alice"], **cert) as alice_token:
        _round_trip(alice)  # no token: the certificate's CN is the principal
        with alice.session("tiny") as s:
            s.feed("All:", output="none")
            for err in (_code(bob.get_state, s.session_id), _code(bob.resume, s.session_id),
                        _code(bob.step, s.session_id, "x")):
                assert err.code == grpc.StatusCode.NOT_FOUND, err  # bob's token outranks the certificate
            assert alice_token.get_state(s.session_id).steps == 4  # the CN's principal is "alice" itself
        with Client(servers.mtls, token="wrong", **cert) as wrong:  # a bad token is refused, not the CN
            assert _code(wrong.list_models).code == UNAUTH


def _cli(*args: str, **env: str) -> subprocess.Popen:
    """Start a client command line with only the RNNSERVE_* variables given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    return subprocess.Popen([str(BIN / args[0]), *args[1:]], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**clean, **env})


def test_command_lines(servers: Servers, pki: Pki, tmp_path: Path) -> None:
    ca, key, token = str(pki.ca), str(pki.client_key), TOKENS["alice"]
    missing = str(tmp_path / "no-such-ca.pem")
    cert = ("--tls-cert", str(pki.client_chain), "--tls-key", key)
    tls, mtls = ("--target", servers.tls), ("--target", servers.mtls)
    runs = {  # name -> (process, expected exit status, expected text in stdout + stderr)
        "models": (_cli("rnn-client", *tls, "--tls-ca", ca, "--token", token, "models"), 0, "tiny-lstm"),
        "models-env": (_cli("rnn-client", "models", RNNSERVE_TARGET=servers.tls, RNNSERVE_TLS_CA=ca,
                            RNNSERVE_TOKEN=token), 0, "tiny-gru"),
        "models-mtls": (_cli("rnn-client", *mtls, "--tls-ca", ca, *cert, "models"), 0, "tiny"),
        "no-token": (_cli("rnn-client", *tls, "--tls-ca", ca, "models"), 1, "UNAUTHENTICATED"),
        "mtls-no-cert": (_cli("rnn-client", *mtls, "--tls-ca", ca, "models"), 1,
                         "give --tls-cert and --tls-key"),
        "bad-ca": (_cli("rnn-client", *tls, "--tls-ca", missing, "--token", token, "models"), 2,
                   f"--tls-ca {missing}: cannot read"),
        "bad-ca-env": (_cli("rnn-client", *tls, "models", RNNSERVE_TLS_CA=missing), 2,
                       f"--tls-ca (from RNNSERVE_TLS_CA) {missing}"),
        "key-as-ca": (_cli("rnn-client", *tls, "--tls-ca", key, "models"), 2,
                      f"--tls-ca {key}: holds no PEM CERTIFICATE"),
        "half-cert": (_cli("rnn-client", *mtls, *cert[:2], "models"), 2,
                      "--tls-cert and --tls-key go together"),
        "health": (_cli("rnn-health", *tls, "--tls-ca", ca), 0, "SERVING"),
        "health-env": (_cli("rnn-health", RNNSERVE_HEALTH_TARGET=servers.tls, RNNSERVE_HEALTH_TLS_CA=ca,
                            RNNSERVE_HEALTH_TLS_SERVER_NAME="localhost"), 0, "SERVING"),
        "health-mtls": (_cli("rnn-health", *mtls, "--tls-ca", ca, *cert), 0, "SERVING"),
        "health-plain": (_cli("rnn-health", *tls, "--timeout", "2"), 1,
                         "if the server speaks TLS, give --tls or --tls-ca"),
        "health-bad-ca": (_cli("rnn-health", *tls, "--tls-ca", missing), 2,
                          f"--tls-ca {missing}: cannot read"),
    }
    for name, (proc, status, text) in runs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == status and text in out + err, (name, proc.returncode, out, err)
        assert "Traceback" not in err, (name, err)
        assert token not in out + err, name


def test_connection_settings_without_a_server(pki: Pki) -> None:
    """The pure part: loopback targets, token checks, flags against the environment, metadata composition."""
    import argparse

    from rnnserve.client import connection, core

    assert all(map(connection.is_loopback, ("127.0.0.1:8001", "localhost:1", "[::1]:8001", "dns:///localhost:80",
                                      "ipv4:127.0.0.2:5", "unix:/tmp/s")))
    assert not any(map(connection.is_loopback, ("10.0.0.1:8001", "example.com:443", "[2001:db8::1]:1", "dns:///a:1")))
    for bad in ("", "  ", "two words", "caf\u00e9", "line\nbreak"):
        with pytest.raises(ValueError, match="token") as exc:
            connection.bearer(bad)
        assert bad.strip() == "" or bad not in str(exc.value)
    conn = connection.connection("127.0.0.1:1", [("authorization", "Bearer old"), ("x-a", "1")], token=" t0k ")
    assert conn.credentials is None and conn.metadata == (("x-a", "1"), ("authorization", "Bearer t0k"))
    assert core.routed(conn.metadata, "sid") == [*conn.metadata, (core.ROUTING_HEADER, "sid")]
    assert connection.connection("127.0.0.1:1", server_name="localhost").credentials is not None  # implies TLS
    with pytest.raises(ValueError, match="cert and key"):
        connection.connection("127.0.0.1:1", cert=pki.client_chain)
    for bad in ("127.0.0.1:70000", "localhost:0", "localhost:abc", "[::1]:99999", "ipv4:127.0.0.1:1,127.0.0.1:65536"):
        with pytest.raises(ValueError, match="port must be a number from 1 to 65535"):  # gRPC: 70000 -> 4464
            connection.connection(bad)
    with pytest.raises(ValueError, match="not with channel="):
        Client("127.0.0.1:1", channel=grpc.insecure_channel("127.0.0.1:1"), ca=pki.ca)

    p = argparse.ArgumentParser()
    connection.add_connection_flags(p, "X_")
    args = p.parse_args(["--tls-ca", str(pki.ca)])
    env = {"X_TOKEN": "from-env", "X_TLS": "on", "X_TLS_CLIENT_CERT": str(pki.client_chain),
           "X_TLS_CLIENT_KEY": str(pki.client_key), "X_TLS_SERVER_NAME": "localhost"}
    got = connection.connection_settings(args, "X_", env)
    assert got == {"token": "from-env", "tls": True, "ca": pki.ca.read_bytes(),
                   "cert": pki.client_chain.read_bytes(), "key": pki.client_key.read_bytes(),
                   "server_name": "localhost"}
    assert connection.connection_settings(p.parse_args(["--tls", "--token", "flag"]), "X_", {"X_TOKEN": "env"}) == \
        {"token": "flag", "tls": True}
    with pytest.raises(ValueError, match=r"--tls \(from X_TLS\) must be 1 or 0"):
        connection.connection_settings(p.parse_args([]), "X_", {"X_TLS": "maybe"})
    with pytest.raises(ValueError, match=r"--tls-key \(from X_TLS_CLIENT_KEY\) .*holds no PEM PRIVATE KEY"):
        connection.connection_settings(p.parse_args(["--tls-cert", str(pki.client_chain)]), "X_",
                                 {"X_TLS_CLIENT_KEY": str(pki.ca)})

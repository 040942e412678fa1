"""Who is calling: a bearer token from a file, a JWT verified against a JWKS, or a TLS client certificate.

Tokens travel as gRPC `authorization: Bearer <token>` metadata (what tritonclient's and the KServe SDK's
`headers=` send). `--auth-tokens FILE` holds sha256 digests, never the tokens, each with its principal
and limits, and is read again when it changes or on SIGHUP. `--auth-jwks FILE` verifies JWTs (PyJWT:
signature, `exp`, `iss`, `aud`); the principal is a claim (`sub`). `--auth-mtls` takes the principal
from a verified client certificate's common name. With none of them, every caller is the anonymous
principal, as before. A failure is UNAUTHENTICATED with one fixed message: nothing that helps guessing.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from .errors import ServeError

log = logging.getLogger(__name__)

REFUSED = "missing or invalid credentials"  # the one message every refusal gets


class Unauthenticated(ServeError):
    """No principal could be established for this call."""

    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class Limits:
    """A principal's quotas (0 = unlimited): live sessions, feed and generated tokens per second, generations
    running at once."""

    sessions: int = 0
    tokens_per_s: float = 0.0
    generations: int = 0


@dataclass(frozen=True)
class Principal:
    """Who a call is from; `name` is "" for the anonymous principal (no authentication configured)."""

    name: str
    limits: Limits = field(default_factory=Limits)
    how: str = ""  # "token" | "jwt" | "mtls" | "" (anonymous)


ANONYMOUS = Principal("")
current: contextvars.ContextVar[Principal] = contextvars.ContextVar("rnnserve_principal", default=ANONYMOUS)


def digest(token: str) -> str:
    """What --auth-tokens stores for a token: the hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenFile:
    """--auth-tokens: {"tokens": [{"principal": NAME, "sha256": HEX, "sessions": N, "tokens_per_s": R,
    "generations": G}, ...]}, read again when its mtime changes (checked at most once a second) or on reload()."""

    def __init__(self, path: Path, defaults: Limits) -> None:
        self.path = Path(path)
        self.defaults = defaults
        self._by_digest: dict[str, Principal] = {}
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def reload(self) -> None:
        """Read the file; a broken file keeps the previous tokens (and says why in the log)."""
        try:
            st = os.stat(self.path)
            entries = json.loads(self.path.read_text(encoding="utf-8"))["tokens"]
            table = {}
            for e in entries:
                limits = Limits(int(e.get("sessions", self.defaults.sessions)),
                                float(e.get("tokens_per_s", self.defaults.tokens_per_s)),
                                int(e.get("generations", self.defaults.generations)))
                h = str(e["sha256"]).lower()
                if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
                    raise ValueError(f"entry for {e.get('principal')!r}: sha256 must be 64 hex digits")
                table[h] = Principal(str(e["principal"]), limits, "token")
        except (OSError, ValueError, KeyError, TypeError) as e:
            if self._stamp is None:
                raise ValueError(f"--auth-tokens {self.path}: {e}") from None
            log.error("--auth-tokens %s not reloaded, the previous tokens stay: %s", self.path, e)
            self._stamp = (st.st_mtime_ns, st.st_size) if "st" in locals() else self._stamp
            return
        self._by_digest, self._stamp = table, (st.st_mtime_ns, st.st_size)
        log.info("--auth-tokens %s: %d token(s) for %d principal(s)", self.path, len(table),
                 len({p.name for p in table.values()}))

    def check_changed(self) -> None:
        """Reload if the file changed on disk."""
        try:
            st = os.stat(self.path)
        except OSError:
            return
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self.reload()

    def lookup(self, token: str) -> Principal | None:
        """The principal of a token, if the file lists its digest."""
        return self._by_digest.get(digest(token))


class JwtVerifier:
    """--auth-jwks: JWTs signed by a key of a JWKS file (or a PEM public key), with `exp`, and `iss`/`aud`
    when --auth-issuer/--auth-audience are set; the principal is the --auth-principal-claim claim."""

    ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

    def __init__(self, path: Path, issuer: str, audience: str, claim: str, defaults: Limits) -> None:
        import jwt

        self.jwt = jwt
        self.issuer, self.audience, self.claim, self.defaults = issuer, audience, claim, defaults
        text = Path(path).read_text(encoding="utf-8")
        self.keys: dict[str | None, tuple[object, list[str]]] = {}  # kid -> (key, algorithms it may sign with)
        try:
            if text.lstrip().startswith("{"):
                for k in jwt.PyJWKSet.from_json(text).keys:
                    self.keys[k.key_id] = (k.key, [k.algorithm_name])
            else:  # a PEM public key: asymmetric algorithms only (no HMAC with a public key)
                self.keys[None] = (text, list(self.ASYMMETRIC))
        except (jwt.PyJWTError, ValueError, KeyError) as e:
            raise ValueError(f"--auth-jwks {path}: not a JWKS: {e}") from None
        if not self.keys:
            raise ValueError(f"--auth-jwks {path}: holds no key")

    def verify(self, token: str) -> Principal | None:
        """The principal a valid token names; None for any failure (bad signature, expired, wrong iss/aud)."""
        jwt = self.jwt
        try:
            kid = jwt.get_unverified_header(token).get("kid")
            entry = self.keys.get(kid) or (next(iter(self.keys.values())) if len(self.keys) == 1 else None)
            if entry is None:
                return None
            key, algorithms = entry
            claims = jwt.decode(token, key, algorithms=algorithms, issuer=self.issuer or None,
                                audience=self.audience or None,
                                options={"require": ["exp"], "verify_aud": bool(self.audience)})
        except (jwt.PyJWTError, ValueError, KeyError, TypeError):
            return None
        name = claims.get(self.claim)
        return Principal(str(name), self.defaults, "jwt") if isinstance(name, str) and name else None


class Authenticator:
    """Turns a call's metadata and TLS peer into a Principal, or refuses it (UNAUTHENTICATED)."""

    def __init__(self, tokens: TokenFile | None = None, jwt: JwtVerifier | None = None, mtls: bool = False,
                 open_methods: tuple[str, ...] = (), defaults: Limits = Limits()) -> None:
        self.tokens, self.jwt, self.mtls = tokens, jwt, mtls
        self.open_methods = open_methods  # method paths (prefixes) anyone may call: health, reflection
        self.defaults = defaults
        self.anonymous = Principal("", defaults)  # every caller without authentication, under the default quotas

    @property
    def enabled(self) -> bool:
        """Whether calls need credentials at all."""
        return bool(self.tokens or self.jwt or self.mtls)

    def is_open(self, method: str) -> bool:
        """Whether /pkg.Service/Method needs no credentials."""
        return method.startswith(self.open_methods) if self.open_methods else False

    @classmethod
    def from_settings(cls, s) -> Authenticator:
        """The authenticator the settings describe (ValueError naming the flag and file when one is bad)."""
        defaults = Limits(s.quota_sessions, s.quota_tokens_per_s, s.quota_generations)
        tokens = TokenFile(s.auth_tokens, defaults) if s.auth_tokens else None
        jwt = (JwtVerifier(s.auth_jwks, s.auth_issuer, s.auth_audience, s.auth_principal_claim, defaults)
               if s.auth_jwks else None)
        return cls(tokens, jwt, s.auth_mtls, s.open_methods(), defaults)

    def authenticate(self, metadata, peer_auth: dict) -> Principal:
        """The caller's principal: a bearer token (file, then JWT), else a client certificate; or refused."""
        if not self.enabled:
            return self.anonymous
        bearer = next((v for k, v in metadata or () if k == "authorization"), None)
        if isinstance(bearer, bytes):
            bearer = bearer.decode("latin-1")
        if bearer is not None:
            scheme, _, token = bearer.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token and len(token) <= 8192:
                if self.tokens is not None:
                    self.tokens.check_changed()
                    p = self.tokens.lookup(token)
                    if p is not None:
                        return p
                if self.jwt is not None and token.count(".") == 2:
                    p = self.jwt.verify(token)
                    if p is not None:
                        return p
            raise Unauthenticated(REFUSED)
        if self.mtls:
            names = (peer_auth or {}).get("x509_common_name") or []
            if names:
                return Principal(names[0].decode("utf-8", "replace"), self.defaults, "mtls")
        raise Unauthenticated(REFUSED)

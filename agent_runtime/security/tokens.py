"""Access and refresh tokens (PyJWT), checked per RFC 8725 and OWASP ASVS 5.0 V9.

- The verifying key is chosen by the token's ``kid`` and the algorithm must be that key's own:
  ``alg=none`` and HS256-with-an-RSA-public-key confusion cannot pass.
- exp and nbf are required and checked with a small leeway; iss, aud and typ must match.
- A revoked ``jti`` (logout, refresh rotation) is refused until the token would have expired, and
  so is every token of a revoked session (``sid``: logout, a replayed refresh token).
- OIDC access tokens must say ``typ: at+jwt`` (RFC 9068) unless ``auth.acceptJwtType`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
from jwt import PyJWK, PyJWKSet

from agent_contract.config import AuthConfig
from agent_contract.keyfiles import KeyRing
from agent_contract.tokens import ACCESS_TYPE, REFRESH_TYPE, Claims, mint_token

__all__ = ["ACCESS_TYPE", "REFRESH_TYPE", "Claims", "LocalTokens", "OidcTokens", "TokenError", "VerifiedCache"]
# Algorithms an OIDC issuer may use; never "none", never HMAC (we hold no shared secret with it).
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
# RFC 9068 section 2.1: the media type, with or without its "application/" prefix.
RFC9068_TYPES = ("at+jwt", "application/at+jwt")
log = logging.getLogger("agent_runtime.tokens")


class TokenError(Exception):
    """A token was refused; ``reason`` is safe to show the caller (it leaks no key material)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _now() -> float:
    return time.time()


class LocalTokens:
    """Tokens this runtime issues and verifies with its own key ring."""

    def __init__(self, config: AuthConfig, keys: KeyRing, clock: Callable[[], float] = _now) -> None:
        self.config = config
        self.keys = keys
        self.clock = clock

    def issue(
        self,
        subject: str,
        roles: tuple[str, ...],
        token_type: str = ACCESS_TYPE,
        session_id: str = "",
        session_start: float = 0.0,
    ) -> tuple[str, Claims]:
        return mint_token(self.config, self.keys, subject, roles, token_type, self.clock(), session_id, session_start)

    def verify(self, token: str, expected_type: str = ACCESS_TYPE) -> Claims:
        header = _header(token)
        kid = header.get("kid")
        key = self.keys.signing.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise TokenError("unknown key id")
        if header.get("alg") != key.algorithm.value:
            raise TokenError("algorithm not allowed for this key")
        if header.get("typ") != expected_type:
            raise TokenError("wrong token type")
        payload = _decode(token, key.verifier, [key.algorithm.value], self.config)
        claims = _claims(payload, expected_type, "roles", with_session=True)
        if expected_type == REFRESH_TYPE and not claims.session_id:
            raise TokenError("missing claim sid")  # a refresh token always belongs to a login session
        return claims


class OidcTokens:
    """Bearer tokens from an OIDC issuer, verified with its JWKS (cached; refreshed at most once
    per ``min_refresh_seconds`` when an unknown kid shows up, so garbage cannot hammer the issuer).

    A failed fetch is remembered too (negative cache): no fetch is tried again for
    ``failure_backoff_seconds``, doubling per consecutive failure up to ``cache_seconds``; until then
    the keys already known still verify and an unknown kid is refused (401), never a 500."""

    def __init__(
        self,
        config: AuthConfig,
        fetch_jwks: Callable[[str], Awaitable[dict[str, Any]]],
        clock: Callable[[], float] = _now,
        cache_seconds: float = 300.0,
        min_refresh_seconds: float = 30.0,
        failure_backoff_seconds: float = 5.0,
    ) -> None:
        if not config.jwks_uri:
            raise ValueError("auth.jwksUri is required with OIDC")
        self.config = config
        self.fetch_jwks = fetch_jwks
        self.clock = clock
        self.cache_seconds = cache_seconds
        self.min_refresh_seconds = min_refresh_seconds
        self.failure_backoff_seconds = failure_backoff_seconds
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = float("-inf")
        self._failures = 0  # consecutive failed fetches
        self._retry_at = float("-inf")  # no fetch before this, after a failure
        self._lock = asyncio.Lock()

    def _fetch_due(self, kid: str) -> bool:
        now = self.clock()
        if now < self._retry_at:
            return False
        since = now - self._fetched_at
        return (kid not in self._keys and since >= self.min_refresh_seconds) or since > self.cache_seconds

    async def _fetch(self) -> None:
        try:
            document = await self.fetch_jwks(str(self.config.jwks_uri))
            jwks = PyJWKSet.from_dict(document)
        except Exception as error:  # unreachable, slow, not JSON, no usable key: all the same
            self._failures += 1
            backoff = min(self.cache_seconds, self.failure_backoff_seconds * 2 ** (self._failures - 1))
            self._retry_at = self.clock() + backoff
            log.warning("JWKS fetch failed (%s); next try in %.0f s", type(error).__name__, backoff)
            return
        self._keys = {k.key_id: k for k in jwks.keys if k.key_id}
        self._fetched_at = self.clock()
        self._failures = 0
        self._retry_at = float("-inf")

    async def _key(self, kid: str) -> PyJWK:
        if self._fetch_due(kid):
            async with self._lock:
                if self._fetch_due(kid):  # another request may have fetched (or failed) meanwhile
                    await self._fetch()
        if kid not in self._keys:
            raise TokenError("signing keys unavailable" if self._failures else "unknown key id")
        return self._keys[kid]

    async def verify(self, token: str, expected_type: str = ACCESS_TYPE) -> Claims:
        header = _header(token)
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise TokenError("unknown key id")
        key = await self._key(kid)
        algorithm = header.get("alg")
        if algorithm not in OIDC_ALGORITHMS or (key.algorithm_name and key.algorithm_name != algorithm):
            raise TokenError("algorithm not allowed for this key")
        typ = header.get("typ")
        typed = isinstance(typ, str) and typ.lower() in RFC9068_TYPES
        # Without RFC 9068's typ an ID token of the same issuer and audience would pass as an access token.
        if not typed and not (self.config.accept_jwt_type and typ in (None, "JWT")):
            raise TokenError("wrong token type")
        payload = _decode(token, key.key, [str(algorithm)], self.config)
        return _claims(payload, expected_type, self.config.roles_claim)


class VerifiedCache:
    """Claims of tokens that already passed verification, so a client reusing its token costs a
    dictionary lookup instead of a signature check. Entries live at most ``max_age_seconds`` and
    never past the token's expiry; revocation is checked on every request regardless."""

    def __init__(
        self, max_entries: int = 10_000, max_age_seconds: float = 60.0, clock: Callable[[], float] = _now
    ) -> None:
        self.max_entries = max_entries
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self._entries: dict[tuple[str, str], tuple[Claims, float]] = {}

    def get(self, token: str, token_type: str) -> Claims | None:
        entry = self._entries.get((token, token_type))
        if entry is None:
            return None
        claims, until = entry
        if self.clock() > until:
            del self._entries[(token, token_type)]
            return None
        return claims

    def put(self, token: str, token_type: str, claims: Claims) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.pop(next(iter(self._entries)))  # the oldest insertion
        self._entries[(token, token_type)] = (claims, min(claims.expires_at, self.clock() + self.max_age_seconds))


def _header(token: str) -> dict[str, Any]:
    if not isinstance(token, str) or token.count(".") != 2 or len(token) > 8192:
        raise TokenError("malformed token")
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise TokenError("malformed token") from None
    return header


def _decode(token: str, key: Any, algorithms: list[str], config: AuthConfig) -> dict[str, Any]:
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            audience=config.audience,
            issuer=config.issuer,
            leeway=config.leeway_seconds,
            options={"require": ["exp", "nbf", "iat", "iss", "aud", "sub", "jti"], "verify_iat": False},
        )
    except jwt.ExpiredSignatureError:
        raise TokenError("token expired") from None
    except jwt.ImmatureSignatureError:
        raise TokenError("token not yet valid") from None
    except jwt.InvalidAudienceError:
        raise TokenError("wrong audience") from None
    except jwt.InvalidIssuerError:
        raise TokenError("wrong issuer") from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenError(f"missing claim {error.claim}") from None
    except jwt.InvalidSignatureError:
        raise TokenError("bad signature") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise TokenError("malformed token") from None
    return payload


def _claims(payload: dict[str, Any], token_type: str, roles_claim: str, with_session: bool = False) -> Claims:
    roles = payload.get(roles_claim) or []
    if isinstance(roles, str):
        roles = roles.split()
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise TokenError(f"claim {roles_claim} must be a list of role names")
    session_id, session_start = "", 0.0
    # Only our own tokens: an OIDC issuer's sid names its session, which logout here cannot end.
    if with_session and "sid" in payload:
        sid, auth_time = payload["sid"], payload.get("auth_time")
        if not isinstance(sid, str) or not sid or not isinstance(auth_time, int) or isinstance(auth_time, bool):
            raise TokenError("malformed session claims")
        session_id, session_start = sid, float(auth_time)
    return Claims(
        str(payload["sub"]),
        tuple(roles),
        str(payload["jti"]),
        float(payload["exp"]),
        token_type,
        session_id,
        session_start,
    )

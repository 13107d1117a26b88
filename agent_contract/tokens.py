"""The shape of the tokens the runtime accepts from its own key ring (RFC 9068 access tokens).

The runtime issues them at login; the operator mints one for the rollout's smoke call, signed
with the agent's own key from its key Secret. Both go through :func:`mint_token`, so the claims,
headers and lifetimes cannot drift apart.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass

import jwt

from agent_contract.config import AuthConfig, RuntimeConfig
from agent_contract.keyfiles import KeyRing

ACCESS_TYPE = "at+jwt"  # RFC 9068
REFRESH_TYPE = "refresh+jwt"
# The subject of the operator's smoke-test tokens, as it appears in the agent's audit trail.
SMOKE_SUBJECT = "system:enterprise-agent-operator"


@dataclass(frozen=True)
class Claims:
    subject: str
    roles: tuple[str, ...]
    token_id: str
    expires_at: float
    token_type: str
    # The login these tokens descend from (``sid``) and when its password was checked
    # (``auth_time``); empty for tokens outside a session (the operator's smoke token).
    session_id: str = ""
    session_start: float = 0.0


def mint_token(
    auth: AuthConfig,
    keys: KeyRing,
    subject: str,
    roles: tuple[str, ...],
    token_type: str,
    now: float,
    session_id: str = "",
    session_start: float = 0.0,
) -> tuple[str, Claims]:
    """A token signed with the ring's active signing key, with the claims the runtime requires.
    Within a session (``session_id``) no token outlives ``session_start + auth.session_max_seconds``."""
    issued = int(now)
    ttl = auth.token_ttl_seconds if token_type == ACCESS_TYPE else auth.refresh_ttl_seconds
    expires = issued + ttl
    if session_id:
        expires = min(expires, int(session_start) + auth.session_max_seconds)
    claims = Claims(
        subject, roles, secrets.token_urlsafe(16), expires, token_type, session_id, float(int(session_start))
    )
    payload: dict[str, object] = {
        "iss": auth.issuer,
        "aud": auth.audience,
        "sub": subject,
        "roles": list(roles),
        "iat": issued,
        "nbf": issued,
        "exp": claims.expires_at,
        "jti": claims.token_id,
    }
    if session_id:
        payload["sid"] = session_id
        payload["auth_time"] = int(session_start)
    signer = keys.signer
    token = jwt.encode(
        payload, signer.private, algorithm=signer.algorithm.value, headers={"kid": signer.kid, "typ": token_type}
    )
    return token, claims


def mint_smoke_token(config: RuntimeConfig, key_files: Mapping[str, bytes]) -> str:
    """A short-lived access token for the operator's smoke call, carrying every role the agent's
    config defines so any enabled operation may be smoke-tested. Raises KeyError or ValueError
    when the key files cannot sign."""
    keys = KeyRing.from_files(key_files, "key Secret")
    token, _ = mint_token(config.auth, keys, SMOKE_SUBJECT, tuple(config.roles), ACCESS_TYPE, time.time())
    return token

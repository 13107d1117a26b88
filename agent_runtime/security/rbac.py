"""Role- and level-based authorisation: a caller's roles grant permissions and a clearance; an
operation declares the permission and the data level it needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from agent_contract.config import Permission, RuntimeConfig, SecurityLevel

# A role the config gives no clearance gets the agents' default level.
DEFAULT_CLEARANCE = SecurityLevel.INTERNAL


class Principal(NamedTuple):
    """Who a request acts for, from its verified token. Made on every request: a named tuple
    is made with 57 opcodes fewer than a frozen dataclass's ``__init__`` took (counted)."""

    subject: str
    roles: tuple[str, ...]
    token_id: str = ""
    expires_at: float = 0.0
    session_id: str = ""  # the login session of a local token (logout ends it)
    session_start: float = 0.0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str


# Decisions remembered per (roles, permission, level): a principal's roles come from signed
# tokens, but an OIDC issuer may send many combinations, so the memory is bounded.
MAX_REMEMBERED_DECISIONS = 1024


class Authorizer:
    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self._decisions: dict[tuple[tuple[str, ...], Permission, SecurityLevel], Decision] = {}

    def permissions(self, principal: Principal) -> set[Permission]:
        granted: set[Permission] = set()
        for role in principal.roles:
            granted.update(self.config.roles.get(role, []))
        return granted

    def clearance(self, principal: Principal) -> SecurityLevel | None:
        known = [role for role in principal.roles if role in self.config.roles]
        if not known:
            return None
        return max(
            (self.config.clearances.get(role, DEFAULT_CLEARANCE) for role in known), key=lambda level: level.rank
        )

    def decide(self, principal: Principal, permission: Permission, level: SecurityLevel) -> Decision:
        """The same for the same roles, permission and level (the config does not change in a
        process), so remembered: working it out again was 3 % of the loop's time on ping."""
        key = (principal.roles, permission, level)
        decision = self._decisions.get(key)
        if decision is None:
            if len(self._decisions) >= MAX_REMEMBERED_DECISIONS:
                self._decisions.clear()
            decision = self._decisions[key] = self._decide(principal.roles, permission, level)
        return decision

    def _decide(self, roles: tuple[str, ...], permission: Permission, level: SecurityLevel) -> Decision:
        principal = Principal("", roles)  # only the roles decide
        if not self.config.security_level.allows(level):
            return Decision(
                False, f"this agent handles data up to {self.config.security_level.value}, not {level.value}"
            )
        if permission not in self.permissions(principal):
            return Decision(
                False,
                f"permission {permission.value!r} is not granted to roles {', '.join(principal.roles) or '(none)'}",
            )
        clearance = self.clearance(principal)
        if clearance is None or not clearance.allows(level):
            return Decision(False, f"clearance {clearance.value if clearance else 'none'} is below {level.value}")
        return Decision(True, "allowed")

"""The operator's timestamps, written one way.

Conditions, Events and Leases carry RFC 3339 times; conditions use whole seconds as Kubernetes
does. The rollout's own timestamps and the Lease keep microseconds: a window measured from a
time cut to the second could end up to a second early.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """Seconds precision, as in Kubernetes conditions and Events."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micro(moment: datetime) -> str:
    """Microsecond precision (metav1.MicroTime): rollout timestamps and Lease renewals."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def compact(moment: datetime) -> str:
    """A timestamp usable as an annotation value or a name part (no colons)."""
    return moment.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def parse(text: Any) -> datetime | None:
    """A time written by any of the above (or by the API server); None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None

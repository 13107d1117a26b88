"""Which namespaces an operator watches (its ``--namespace`` options), and how it lists and
watches them: one place for the controller's lists and filters and for kopf's watches."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

# A namespace name (DNS-1123 label) in which ``*`` and ``?`` may stand for characters.
_PATTERN = re.compile(r"[a-z0-9*?]([-a-z0-9*?]{0,61}[a-z0-9*?])?")
_GLOB_CHARACTERS = frozenset("*?")


def namespace_pattern(value: str) -> str:
    """Checks one ``--namespace`` value: a name, or a glob of one (``team-*``). kopf would read
    ``!`` and ``,`` as its own pattern syntax, which our lists do not share: refused here."""
    if not _PATTERN.fullmatch(value):
        raise ValueError(
            f"namespace pattern {value!r}: expected a namespace name (lower-case letters, digits and '-',"
            " at most 63) in which '*' and '?' may stand for characters"
        )
    return value


@dataclass(frozen=True)
class WatchedNamespaces:
    """Empty ``patterns``: every namespace."""

    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern in self.patterns:
            namespace_pattern(pattern)

    @property
    def names(self) -> tuple[str, ...] | None:
        """The namespaces, when every pattern is a plain name; None for all or for any glob."""
        if not self.patterns or any(_GLOB_CHARACTERS & set(p) for p in self.patterns):
            return None
        return self.patterns

    def list_scopes(self) -> list[str | None]:
        """Where to list: in each named namespace, else across the cluster (None)."""
        return list(self.names) if self.names is not None else [None]

    def covers(self, namespace: str) -> bool:
        return not self.patterns or any(fnmatch.fnmatchcase(namespace, p) for p in self.patterns)

    @property
    def watch_clusterwide(self) -> bool:
        """Whether the watches run across the cluster (and events outside the patterns are
        dropped) rather than one per named namespace. A glob is watched across the cluster:
        kopf would otherwise watch each matching namespace on its own, starting those watches
        from its watch of Namespaces, and that watch ignores what its initial list (and every
        relist) returns: a namespace created between kopf's first list of namespaces and the
        start of that watch was never watched (seen in CI: an agent whose Deployment became
        available stayed Progressing, no child event ever arriving). Named namespaces keep
        per-namespace watches, which a namespace-scoped Role allows."""
        return self.names is None

"""Which namespaces `agent-operator run -n` watches, and how: lists, filters and kopf's watches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent_operator.namespaces import WatchedNamespaces

AGENT_OPERATOR = str(Path(sys.executable).parent / "agent-operator")


def test_named_namespaces_are_listed_and_watched_one_by_one() -> None:
    scope = WatchedNamespaces(("team-a", "team-b"))
    assert scope.names == ("team-a", "team-b")
    assert scope.list_scopes() == ["team-a", "team-b"]
    assert not scope.watch_clusterwide  # a namespace-scoped Role allows no more
    assert scope.covers("team-a")
    assert not scope.covers("team-c")


def test_a_glob_is_listed_and_watched_across_the_cluster_and_filtered() -> None:
    scope = WatchedNamespaces(("team-a", "ci-*"))
    assert scope.names is None
    assert scope.list_scopes() == [None]
    assert scope.watch_clusterwide
    assert scope.covers("ci-1234")
    assert scope.covers("team-a")
    assert not scope.covers("team-b")
    assert not scope.covers("prod-ci-1")


def test_no_namespace_given_means_all() -> None:
    scope = WatchedNamespaces()
    assert scope.watch_clusterwide
    assert scope.list_scopes() == [None]
    assert scope.covers("anything")


@pytest.mark.parametrize("value", ["Team-A", "team_a", "!team-a", "team-a,team-b", "-team", "x" * 64, "", "[ab]-*"])
def test_agent_operator_run_refuses_a_bad_namespace_naming_the_option(value: str) -> None:
    # Refused before any cluster is contacted: no KUBECONFIG is needed to see the error.
    result = subprocess.run(
        [AGENT_OPERATOR, "run", "-n", "ok", f"--namespace={value}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--namespace" in result.stderr, result.stderr
    assert repr(value) in result.stderr, result.stderr
    with pytest.raises(ValueError, match="namespace pattern"):
        WatchedNamespaces(("ok", value))

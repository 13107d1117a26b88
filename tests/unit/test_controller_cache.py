"""The controller's watch caches: what a DELETED event may remove."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agent_operator.controller import Controller, ControllerSettings
from agent_operator.kube import Kube
from agent_operator.render.common import LABEL_INSTANCE
from tests.helpers import served


def _config_map(uid: str, namespace: str, agent: str) -> dict[str, Any]:
    labels = {LABEL_INSTANCE: agent}
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "web-config", "namespace": namespace, "uid": uid, "labels": labels}}  # fmt: skip


def test_a_deleted_event_of_an_older_agent_of_the_same_name_keeps_the_new_one() -> None:
    controller = Controller(cast(Kube, None), ControllerSettings())
    old, new = served("minimal", uid="old"), served("minimal", uid="new")
    key = (new["metadata"]["namespace"], new["metadata"]["name"])
    controller.observe_agent("ADDED", new)  # recreated while the watch was away
    controller.observe_agent("DELETED", old)  # the old one's deletion, delivered late
    record = controller.records[key]
    assert record.body is not None
    assert record.body["metadata"]["uid"] == "new"
    controller.observe_agent("DELETED", new)
    assert key not in controller.records


def test_a_deleted_event_of_an_older_child_of_the_same_name_keeps_the_new_one() -> None:
    async def scenario() -> None:
        controller = Controller(cast(Kube, None), ControllerSettings())
        agent = served("minimal", uid="agent")
        namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
        controller.observe_agent("ADDED", agent)
        controller.observe_child("ADDED", _config_map("new", namespace, name))
        controller.observe_child("DELETED", _config_map("old", namespace, name))
        children = controller.records[(namespace, name)].children
        assert children[("v1", "ConfigMap", "web-config")]["metadata"]["uid"] == "new"
        controller.observe_child("DELETED", _config_map("new", namespace, name))
        assert ("v1", "ConfigMap", "web-config") not in children

    asyncio.run(scenario())

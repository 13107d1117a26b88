"""The controller's watch caches: what a DELETED event may remove, and what a list catches up on."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from agent_operator.controller import Controller, ControllerSettings
from agent_operator.kube import Kube
from agent_operator.namespaces import WatchedNamespaces
from agent_operator.render.common import LABEL_INSTANCE
from tests.helpers import drain, queued, served


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


def test_a_labelled_object_holding_any_json_is_cached_and_read_back() -> None:
    """The cache keeps children as JSON: what kopf's watch parsed from a ControllerRevision (its
    data takes any JSON: an integer beyond 64 bits, non-ASCII text) is kept, and read back."""

    async def scenario() -> None:
        controller = Controller(cast(Kube, None), ControllerSettings())
        agent = served("minimal", uid="agent")
        namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
        controller.observe_agent("ADDED", agent)
        revision = {
            "apiVersion": "apps/v1",
            "kind": "ControllerRevision",
            "metadata": {"name": "minimal-x", "namespace": namespace, "uid": "r", "labels": {LABEL_INSTANCE: name},
                         "managedFields": [{"manager": "kubectl"}]},
            "revision": 1,
            "data": {"big": 2**70, "text": "caf\u00e9 \U0001f600", "nested": [{"a": None, "b": 1.5, "c": True}]},
        }  # fmt: skip
        controller.observe_child("ADDED", revision)
        cached = controller.records[(namespace, name)].children[("apps/v1", "ControllerRevision", "minimal-x")]
        assert cached["data"]["big"] == float(2**70)
        assert cached["data"]["text"] == "caf\u00e9 \U0001f600"
        assert cached["data"]["nested"] == [{"a": None, "b": 1.5, "c": True}]
        assert "managedFields" not in cached["metadata"]
        cached["data"]["text"] = "changed by a reader"  # a copy: the cache is not changed through it
        again = controller.records[(namespace, name)].children[("apps/v1", "ControllerRevision", "minimal-x")]
        assert again["data"]["text"] == "caf\u00e9 \U0001f600"

    asyncio.run(scenario())


class ListingApi:
    """Lists the objects it holds; no referenced object, and its watches stay silent."""

    def __init__(self, *objects: dict[str, Any]) -> None:
        self.objects = list(objects)

    async def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    async def list_metadata(self, *_: Any) -> tuple[builtins.list[dict[str, Any]], str]:
        return [], "1"

    async def watch_metadata(self, *_: Any) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        await asyncio.Event().wait()
        yield "BOOKMARK", {}


def test_a_child_deleted_before_the_watches_began_is_forgotten_soon_after_the_start() -> None:
    """Between the controller's first lists and the start of kopf's watches a deletion has no
    event: the list a few seconds after the start catches it (the periodic resync, an hour away
    here, would be too late: the child would not be recreated until then)."""

    async def scenario() -> None:
        agent = served("minimal", uid="agent")
        namespace, name = agent["metadata"]["namespace"], agent["metadata"]["name"]
        child = _config_map("cm", namespace, name)
        api = ListingApi(agent, child)
        # No workers: the test takes the queued agent itself.
        controller = Controller(cast(Kube, api), ControllerSettings(resync_seconds=3600, workers=0))
        await controller.prime(WatchedNamespaces())
        children = controller.records[(namespace, name)].children
        assert ("v1", "ConfigMap", "web-config") in children
        await drain(controller)
        api.objects.remove(child)  # deleted before any watch began
        stop = asyncio.Event()
        running = asyncio.create_task(controller.run(stop))
        try:
            deadline = time.monotonic() + 20
            while ("v1", "ConfigMap", "web-config") in children or not queued(controller):
                assert time.monotonic() < deadline, "the deleted child is still in the cache, or its agent not queued"
                await asyncio.sleep(0.05)
            assert await drain(controller) == {(namespace, name)}  # its agent, to recreate the child
        finally:
            stop.set()
            await running

    asyncio.run(scenario())

"""Whether a child's name is taken, known without a read: the controller watches the names of the
objects of its children's kinds not labelled as its own (metadata only), and its caches hold the
ones labelled as its own. A new agent's children then cost no GET, a name that is taken still
stalls the agent (NameConflict), and while a watch is not live every name is read as before.
Driven through a stand-in API that counts its reads (GET by name) and serves lists and watches."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from agent_operator.controller import Controller, ControllerSettings
from agent_operator.kinds import CHILD_KINDS
from agent_operator.kube import Kube
from tests.helpers import drain, served

NAMESPACE = "default"
OURS = "app.kubernetes.io/managed-by=enterprise-agent-operator"
WATCHED_CHILD_KINDS = {kind.kind for kind in CHILD_KINDS if kind.watched}


class Api:
    """Objects by (kind, name), read by name, listed and watched metadata only; children written."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads: list[tuple[str, str]] = []
        self.applied: list[tuple[str, str]] = []
        self.selectors: set[str | None] = set()
        self.events: dict[str, asyncio.Queue[tuple[str, dict[str, Any]]]] = {}
        self.versions = 1

    def add(self, kind: str, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        self.versions += 1
        metadata = {
            "name": name,
            "namespace": NAMESPACE,
            "uid": f"theirs-{name}",
            "resourceVersion": str(self.versions),
        }
        obj = {"apiVersion": "v1", "kind": kind, "metadata": {**metadata, "labels": labels or {}}}
        self.objects[(kind, name)] = obj
        return obj

    def _stored(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.versions += 1
        uid = f"uid-{self.versions}"
        stored = {**manifest, "metadata": {**manifest["metadata"], "uid": uid, "resourceVersion": str(self.versions)}}
        self.objects[(manifest["kind"], manifest["metadata"]["name"])] = stored
        return stored

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append((kind, name))
        return self.objects.get((kind, name))

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self._stored(manifest)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.applied.append((manifest["kind"], manifest["metadata"]["name"]))
        return self._stored(manifest)

    async def apply_status(self, namespace: str, name: str, status: Any, resource_version: Any = None) -> Any:
        self.versions += 1
        written = agent(name)
        return {**written, "metadata": {**written["metadata"], "resourceVersion": str(self.versions)}, "status": status}

    async def post_event(self, *_: Any) -> None:
        return None

    async def list(self, *_: Any, **__: Any) -> list[dict[str, Any]]:
        return []

    async def list_metadata(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        keep: Callable[[Mapping[str, Any]], bool],
        label_selector: str | None = None,
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        self.selectors.add(label_selector)
        theirs = [
            {"metadata": obj["metadata"]}
            for (k, _), obj in self.objects.items()
            if k == kind
            and label_selector == OURS.replace("=", "!=")
            and "app.kubernetes.io/managed-by" not in obj["metadata"]["labels"]
        ]
        return [item for item in theirs if keep(item["metadata"])], str(self.versions)

    async def watch_metadata(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        version: str,
        timeout: int,
        label_selector: str | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        events = self.events.setdefault(f"{kind} {label_selector}", asyncio.Queue())
        while True:
            yield await events.get()

    def send(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        self.events.setdefault(f"{kind} {OURS.replace('=', '!=')}", asyncio.Queue()).put_nowait(
            (event_type, {"metadata": obj["metadata"]})
        )


def agent(name: str) -> dict[str, Any]:
    body = served("minimal", uid=f"uid-{name}")
    body["metadata"]["name"] = name
    return body


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def reconcile(controller: Controller, name: str) -> str:
    controller.observe_agent("ADDED", agent(name))
    await drain(controller)
    return await controller.reconcile((NAMESPACE, name))


def stalled_message(controller: Controller, name: str) -> str:
    body = controller.records[(NAMESPACE, name)].body
    assert body is not None
    return str(body["status"]["message"])


def test_a_new_agents_children_cost_no_reads_and_a_taken_name_still_stalls_it() -> None:
    async def scenario() -> None:
        api = Api()
        api.add("Service", "support-bot")  # made by hand before the operator started
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000, workers=0))
        controller.start_leading()
        stop = asyncio.Event()
        running = asyncio.create_task(controller.run(stop))
        try:
            await wait_for(
                lambda: {kind for kind, _ in controller._live_name_watches} == WATCHED_CHILD_KINDS,
                "every child kind's names listed",
            )
            assert OURS.replace("=", "!=") in api.selectors  # only what is not ours passes the wire

            assert await reconcile(controller, "fresh") != "stalled"
            assert api.reads == []  # not one GET for its 8 children
            assert len(api.applied) >= 7

            assert await reconcile(controller, "support-bot") == "stalled"
            assert api.reads == [("Service", "support-bot")]  # the one name the watch listed, and only it
            assert "Service support-bot already exists and is not controlled by this agent" in stalled_message(
                controller, "support-bot"
            )
            assert ("Service", "support-bot") not in api.applied  # neither adopted nor changed

            # Made after the list: the watch's event takes the name; its deletion frees it.
            late = api.add("Service", "late")
            api.send("Service", "ADDED", late)
            await wait_for(lambda: (NAMESPACE, "late") in controller._foreign_names[("Service", None)], "the event")
            api.reads.clear()
            assert await reconcile(controller, "late") == "stalled"
            assert api.reads == [("Service", "late")]
            del api.objects[("Service", "late")]
            api.send("Service", "DELETED", late)
            await wait_for(lambda: (NAMESPACE, "late") not in controller._foreign_names[("Service", None)], "deleted")
            api.reads.clear()
            assert await reconcile(controller, "late") != "stalled"
            assert api.reads == []

            # Another agent's child (labelled as ours, in its cache): agent web's preview Service is
            # the name agent web-preview's active Service wants. Known from the cache, not read.
            assert await reconcile(controller, "web") != "stalled"
            api.reads.clear()
            assert await reconcile(controller, "web-preview") == "stalled"
            assert api.reads == []
            assert "Service web-preview already exists, controlled by EnterpriseAgent web" in stalled_message(
                controller, "web-preview"
            )

            # Labelled as ours but for no agent: neither watch's cache holds it, so it is read.
            bare = api.add("Service", "bare", {"app.kubernetes.io/managed-by": "enterprise-agent-operator"})
            controller.observe_child("ADDED", bare)
            assert await reconcile(controller, "bare") == "stalled"
            assert ("Service", "bare") in api.reads
        finally:
            stop.set()
            await running

        # No watch live (stopped here; broken or not listed yet in life): every name is read again.
        assert not controller._live_name_watches
        api.reads.clear()
        api.applied.clear()
        assert await reconcile(controller, "cold") != "stalled"
        assert sorted(api.reads) == sorted(api.applied)

    asyncio.run(scenario())

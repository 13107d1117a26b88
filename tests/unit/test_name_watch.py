"""Whether a child's name is taken, known without a read: the controller watches the names of all
objects of its children's kinds that do not churn (metadata only). A new agent's children of those
kinds then cost no GET, a name that is taken costs one and still stalls the agent (NameConflict),
and while a watch is not live every name is read as before. Driven through a stand-in API that counts its reads (GET by name)
and serves lists and watches."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from agent_operator.controller import NAME_WATCHED_KINDS, Controller, ControllerSettings
from agent_operator.kube import Kube
from tests.helpers import drain, served

NAMESPACE = "default"
MANAGED_BY = "app.kubernetes.io/managed-by"


class Api:
    """Objects by (kind, name), read by name, listed and watched metadata only; children written."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.reads: list[tuple[str, str]] = []
        self.applied: list[tuple[str, str]] = []
        self.agents: dict[str, dict[str, Any]] = {}
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
        self.send(manifest["kind"], "ADDED", stored)  # as the API server's watch would show it
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
        metadata = {**written["metadata"], "resourceVersion": str(self.versions)}
        self.agents[name] = {**written, "metadata": metadata, "status": status}
        return self.agents[name]

    async def post_event(self, *_: Any) -> None:
        return None

    async def list(
        self, api_version: str, kind: str, namespace: str | None = None, label_selector: str | None = None
    ) -> builtins.list[dict[str, Any]]:
        """As the controller's relist asks: the agents, and the children by our label."""
        if kind == "EnterpriseAgent":
            return builtins.list(self.agents.values())
        return [o for (k, _), o in self.objects.items() if k == kind and MANAGED_BY in o["metadata"]["labels"]]

    async def list_metadata(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        keep: Callable[[Mapping[str, Any]], bool],
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        listed = [{"metadata": obj["metadata"]} for (k, _), obj in self.objects.items() if k == kind]
        return [item for item in listed if keep(item["metadata"])], str(self.versions)

    async def watch_metadata(
        self,
        api_version: str,
        kind: str,
        namespace: str | None,
        version: str,
        timeout: int,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        events = self.events.setdefault(kind, asyncio.Queue())
        while True:
            yield await events.get()

    def send(self, kind: str, event_type: str, obj: dict[str, Any]) -> None:
        self.events.setdefault(kind, asyncio.Queue()).put_nowait((event_type, {"metadata": obj["metadata"]}))


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

        def taken(kind: str) -> set[tuple[str, str]]:
            return controller._taken_names.get((kind, None), set())

        watched = {kind.kind for kind in NAME_WATCHED_KINDS}

        def watched_reads() -> list[tuple[str, str]]:
            return [read for read in api.reads if read[0] in watched]

        stop = asyncio.Event()
        running = asyncio.create_task(controller.run(stop))
        try:
            await wait_for(
                lambda: {kind for kind, _ in controller._live_name_watches} == watched,
                "every child kind's names listed",
            )

            assert await reconcile(controller, "fresh") != "stalled"
            # Only the names of the kinds whose status churns (not watched) are read.
            assert sorted(api.reads) == sorted(n for n in api.applied if n[0] not in watched)
            assert {kind for kind, _ in api.reads} == {"Deployment", "PodDisruptionBudget"}
            assert len(api.applied) >= 7

            assert await reconcile(controller, "support-bot") == "stalled"
            assert watched_reads() == [("Service", "support-bot")]  # the one name the watch listed, and only it
            assert "Service support-bot already exists and is not controlled by this agent" in stalled_message(
                controller, "support-bot"
            )
            assert ("Service", "support-bot") not in api.applied  # neither adopted nor changed

            # Made after the list: the watch's event takes the name; its deletion frees it.
            late = api.add("Service", "late")
            api.send("Service", "ADDED", late)
            await wait_for(lambda: (NAMESPACE, "late") in taken("Service"), "the event")
            api.reads.clear()
            assert await reconcile(controller, "late") == "stalled"
            assert watched_reads() == [("Service", "late")]
            del api.objects[("Service", "late")]
            api.send("Service", "DELETED", late)
            await wait_for(lambda: (NAMESPACE, "late") not in taken("Service"), "deleted")
            api.reads.clear()
            assert await reconcile(controller, "late") != "stalled"
            assert watched_reads() == []

            # Another agent's child: agent web's preview Service is the name agent web-preview's
            # active Service wants. One read, and neither agent's Service is changed.
            assert await reconcile(controller, "web") != "stalled"
            await wait_for(lambda: (NAMESPACE, "web-preview") in taken("Service"), "web's children seen")
            api.reads.clear()
            api.applied.clear()
            assert await reconcile(controller, "web-preview") == "stalled"
            assert watched_reads() == [("Service", "web-preview")]
            assert api.applied == []
            assert "Service web-preview already exists, controlled by EnterpriseAgent web" in stalled_message(
                controller, "web-preview"
            )
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

"""The controller's watch of referenced Secrets and ConfigMaps: an event (or a relist) of an object
an agent references queues that agent, once per version; everything else is dropped as it arrives,
and nothing is kept of it. Driven through a stand-in API that serves a list and a watch stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from agent_operator.controller import Controller, ControllerSettings
from agent_operator.kube import Kube, KubeError
from tests.helpers import served

KEY = ("default", "hello-agent")
SYNC: tuple[str, dict[str, Any]] = (
    "SYNC",
    {},
)  # not an API event: marks that the controller has taken every event before it


def meta(name: str, version: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "resourceVersion": version}}


class Api:
    """Secrets by name, listed and watched metadata only; a status write and Events accepted."""

    def __init__(self) -> None:
        self.secrets: dict[str, dict[str, Any]] = {}
        self.events: asyncio.Queue[tuple[str, dict[str, Any]] | KubeError] = asyncio.Queue()
        self.synced = asyncio.Event()
        self.lists: list[list[str]] = []  # the names each list kept

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.secrets.get(name) if kind == "Secret" else None

    async def list_metadata(
        self, api_version: str, kind: str, namespace: str | None, keep: Callable[[Mapping[str, Any]], bool]
    ) -> tuple[list[dict[str, Any]], str]:
        objects = self.secrets.values() if kind == "Secret" else []
        kept = [{"metadata": o["metadata"]} for o in objects if keep(o["metadata"])]
        self.lists.append([o["metadata"]["name"] for o in kept])
        return kept, "100"

    async def watch_metadata(
        self, api_version: str, kind: str, namespace: str | None, version: str, timeout: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while True:
            event = await self.events.get()
            if isinstance(event, KubeError):
                raise event
            if event is SYNC:
                self.synced.set()
                continue
            yield event

    async def apply_status(self, namespace: str, name: str, status: Any, resource_version: Any = None) -> Any:
        written = agent()  # as the API server answers: the whole agent, at a new version
        return {**written, "metadata": {**written["metadata"], "resourceVersion": "2"}, "status": status}

    async def post_event(self, *_: Any) -> None:
        return None

    async def sync(self, *events: tuple[str, dict[str, Any]] | KubeError) -> None:
        """Streams ``events`` and returns once the controller has taken them all."""
        self.synced.clear()
        for event in (*events, SYNC):
            self.events.put_nowait(event)
        await self.synced.wait()


def agent() -> dict[str, Any]:
    body = served("minimal", uid="u1")
    body["spec"]["env"] = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    return body


def queued(controller: Controller) -> bool:
    return len(controller.queue) > 0


async def drain(controller: Controller) -> None:
    while queued(controller):
        controller.queue.done(await controller.queue.get())


def test_only_events_of_referenced_objects_queue_their_agent_once_per_version() -> None:
    async def scenario() -> None:
        api = Api()
        # Backoff far away: the Stalled agent's own retry must not fire during the test.
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000))
        controller.observe_agent("ADDED", agent())
        controller.start_leading()
        await drain(controller)
        assert await controller.reconcile(KEY) == "stalled"  # the Secret is not there yet
        watch = asyncio.create_task(controller._watch_references("Secret", "default"))
        try:
            await api.sync(*(("ADDED", meta(f"unrelated-{i}", str(i))) for i in range(100)))
            assert not queued(controller)
            assert api.lists == [[]]  # nothing listed was kept: none of it is referenced

            await api.sync(("ADDED", meta("creds", "101")))  # it appears: the agent recovers at once
            assert queued(controller)
            await drain(controller)
            await api.sync(("MODIFIED", meta("creds", "101")))  # a version already seen
            assert not queued(controller)
            await api.sync(("BOOKMARK", meta("", "150")), ("MODIFIED", meta("creds", "151")))  # rotated
            assert queued(controller)
            await drain(controller)
            await api.sync(("DELETED", meta("creds", "152")))
            assert queued(controller)
            await drain(controller)

            # The version is too old (410): list again; what changed in the gap queues the agent.
            api.secrets["creds"] = meta("creds", "160")
            await api.sync(KubeError(410, "Gone"))
            assert api.lists == [[], ["creds"]]
            assert queued(controller)
            await drain(controller)
            await api.sync(("MODIFIED", meta("unrelated-1", "161")))
            assert not queued(controller)

            # The agent no longer references it: its events are dropped too.
            controller.observe_agent("DELETED", agent())
            await api.sync(("MODIFIED", meta("creds", "170")))
            assert not queued(controller)
            assert controller._referrers == {}
            assert controller._reference_versions == {}
        finally:
            watch.cancel()

    asyncio.run(scenario())


def test_the_reconcile_reads_each_referenced_object_by_name_and_indexes_it_first() -> None:
    async def scenario() -> None:
        api = Api()
        api.secrets["creds"] = {**meta("creds", "5"), "data": {}}  # there, without the key
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000))
        controller.observe_agent("ADDED", agent())
        controller.start_leading()
        await drain(controller)
        assert await controller.reconcile(KEY) == "stalled"
        status = controller.records[KEY].body
        assert status is not None
        assert (
            status["status"]["message"] == "spec.env[0].valueFrom.secretKeyRef.key: Secret 'creds' has no key 'token'"
        )
        # The version the reconcile read is the version seen: the watch's event for it is no news.
        controller.observe_reference("Secret", "MODIFIED", meta("creds", "5"))
        assert not queued(controller)
        controller.observe_reference("Secret", "MODIFIED", meta("creds", "6"))
        assert queued(controller)

    asyncio.run(scenario())

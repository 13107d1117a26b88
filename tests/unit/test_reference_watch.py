"""The controller's watch of referenced Secrets and ConfigMaps: an event (or a relist) of an object
an agent references queues that agent, once per version; everything else is dropped as it arrives,
and nothing is kept of it. Driven through a stand-in API that serves a list and a watch stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, cast

from agent_operator.controller import Controller, ControllerSettings
from agent_operator.kube import Kube, KubeError
from tests.helpers import drain, queued, served

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
        self.events: asyncio.Queue[tuple[str, dict[str, Any]] | Exception] = asyncio.Queue()
        self.synced = asyncio.Event()
        self.lists: list[list[str]] = []  # the names each list kept
        self.reads: list[str] = []  # the names read one by one (GET)
        self.listing = asyncio.Event()  # a list was asked for
        self.lists_open = asyncio.Event()  # lists answer (cleared: a list waits until set)
        self.lists_open.set()

    async def find(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads.append(name)
        return self.secrets.get(name) if kind == "Secret" else None

    async def list_metadata(
        self, api_version: str, kind: str, namespace: str | None, keep: Callable[[Mapping[str, Any]], bool]
    ) -> tuple[list[dict[str, Any]], str]:
        self.listing.set()
        await self.lists_open.wait()
        objects = self.secrets.values() if kind == "Secret" else []
        kept = [{"metadata": o["metadata"]} for o in objects if keep(o["metadata"])]
        self.lists.append([o["metadata"]["name"] for o in kept])
        return kept, "100"

    async def watch_metadata(
        self, api_version: str, kind: str, namespace: str | None, version: str, timeout: int
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        while True:
            event = await self.events.get()
            if isinstance(event, Exception):
                raise event
            if event is SYNC:
                self.synced.set()
                continue
            yield event

    async def apply_status(self, namespace: str, name: str, status: Any, resource_version: Any = None) -> Any:
        written = agent(name)  # as the API server answers: the whole agent, at a new version
        return {**written, "metadata": {**written["metadata"], "resourceVersion": "2"}, "status": status}

    async def post_event(self, *_: Any) -> None:
        return None

    async def sync(self, *events: tuple[str, dict[str, Any]] | Exception) -> None:
        """Streams ``events`` and returns once the controller has taken them all."""
        self.synced.clear()
        for event in (*events, SYNC):
            self.events.put_nowait(event)
        await self.synced.wait()


def agent(name: str = KEY[1]) -> dict[str, Any]:
    body = served("minimal", uid=f"uid-{name}")
    body["metadata"]["name"] = name
    body["spec"]["env"] = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}}]
    return body


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


def test_an_agent_that_reads_a_shared_object_first_does_not_hide_its_change_from_the_others() -> None:
    """Two agents read one Secret (a team's model key). One reconciles for another reason (a pod
    event, a timer) and reads the new version before the watch tells of it: the watch's event must
    still queue the other, whose pods run the old content, and a relist after a watch gap too."""

    async def scenario() -> None:
        api = Api()
        api.secrets["creds"] = {**meta("creds", "5"), "data": {}}
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000))
        first, other = ("default", "first"), ("default", "other")
        for key in (first, other):
            controller.observe_agent("ADDED", agent(key[1]))
        controller.start_leading()
        await drain(controller)
        for key in (first, other):
            assert await controller.reconcile(key) == "stalled"  # both read version 5
        await drain(controller)

        api.secrets["creds"] = {**meta("creds", "6"), "data": {}}
        assert await controller.reconcile(first) == "stalled"  # reads 6 before the watch's event
        await drain(controller)
        controller.observe_reference("Secret", "MODIFIED", meta("creds", "6"))
        assert other in await drain(controller)

        # The same through a relist: the watch was down while the first agent read version 7.
        for key in (first, other):
            assert await controller.reconcile(key) == "stalled"
        api.secrets["creds"] = {**meta("creds", "7"), "data": {}}
        assert await controller.reconcile(first) == "stalled"
        await drain(controller)
        controller.listed_references("Secret", None, [meta("creds", "7")])
        assert other in await drain(controller)

    asyncio.run(scenario())


def test_an_unchanged_object_is_read_again_only_when_its_watch_cannot_vouch_for_it() -> None:
    """With its watch live, an object is read once per version, not on every reconcile of every
    agent that references it (1,000 agents reconciled every resync would read it 1,000 times);
    with the watch down (until it has listed again) every reconcile reads it."""

    def message(controller: Controller, key: tuple[str, str]) -> str:
        body = controller.records[key].body
        assert body is not None
        return str(body["status"]["message"])

    async def scenario() -> None:
        api = Api()
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000))
        keys = [("default", f"agent-{i}") for i in range(3)]
        for key in keys:
            controller.observe_agent("ADDED", agent(key[1]))
        controller.start_leading()
        await drain(controller)
        watch = asyncio.create_task(controller._watch_references("Secret", "default"))
        try:
            await api.sync()  # listed and watching
            for _ in range(3):
                for key in keys:
                    assert await controller.reconcile(key) == "stalled"
                    assert "Secret 'creds' not found" in message(controller, key)
            assert api.reads == ["creds"]  # nine reconciles, one read

            api.secrets["creds"] = {**meta("creds", "6"), "data": {}}
            await api.sync(("ADDED", meta("creds", "6")))
            assert set(await drain(controller)) == set(keys)
            for key in keys:
                assert await controller.reconcile(key) == "stalled"
                assert "Secret 'creds' has no key 'token'" in message(controller, key)  # each saw it
            assert api.reads == ["creds", "creds"]

            # The watch ends (410): until it has listed again, what it showed cannot be trusted.
            api.listing.clear()
            api.lists_open.clear()
            api.events.put_nowait(KubeError(410, "Gone"))
            await api.listing.wait()
            del api.secrets["creds"]
            assert await controller.reconcile(keys[0]) == "stalled"
            assert "Secret 'creds' not found" in message(controller, keys[0])
            assert await controller.reconcile(keys[0]) == "stalled"
            assert api.reads == ["creds"] * 4
            api.lists_open.set()
            await api.sync()  # listed again: the others are told
            assert set(keys[1:]) <= await drain(controller)
            for key in keys:
                assert await controller.reconcile(key) == "stalled"
                assert "Secret 'creds' not found" in message(controller, key)
            assert api.reads == ["creds"] * 4  # the list vouches for the last read: gone
        finally:
            watch.cancel()

    asyncio.run(scenario())


def test_the_reference_watch_outlives_an_error_it_did_not_expect() -> None:
    """Anything the watch raises (a proxy's HTML where JSON was due, a bug) is logged and the watch
    lists again after its backoff: a task that ended would never again see a change."""

    async def scenario() -> None:
        api = Api()
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=0.01))
        watch = asyncio.create_task(controller._watch_references("Secret", "default"))
        try:
            await api.sync()
            api.listing.clear()
            api.events.put_nowait(ValueError("Expecting value: line 1 column 1 (char 0)"))
            await asyncio.wait_for(api.listing.wait(), timeout=30)
            await api.sync()  # and watches again
            assert not watch.done()
        finally:
            watch.cancel()

    asyncio.run(scenario())

"""The controller facing the API server's discovery lag: right after a CRD is installed, every child
an agent owns is refused 403 "cannot find RESTMapping" for up to 30 s. Driven through a stand-in
API that refuses as that admission does, until told the API server has caught up."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

from agent_operator.controller import Controller, ControllerSettings
from agent_operator.kube import Kube, KubeError
from tests.helpers import drain, served

REFUSAL = json.dumps({
    "kind": "Status", "code": 403, "reason": "Forbidden",
    "message": 'configmaps "x" is forbidden: cannot set blockOwnerDeletion in this case because cannot find'
    ' RESTMapping for APIVersion agents.enterprise.io/v1alpha1 Kind EnterpriseAgent: no matches for kind',
})  # fmt: skip


class Api:
    """Children created and applied, status written, Events accepted; all refused while ``lagging``."""

    def __init__(self) -> None:
        self.lagging = True
        self.secrets_sent: dict[str, list[dict[str, str]]] = {}  # agent -> the key data of each try
        self.status_writes: dict[str, list[dict[str, Any]]] = {}
        self.versions = 1

    def _stored(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.lagging:
            raise KubeError(403, "Forbidden", REFUSAL)
        self.versions += 1
        metadata = {**manifest["metadata"], "uid": f"uid-{self.versions}", "resourceVersion": str(self.versions)}
        return {**manifest, "metadata": metadata}

    async def find(self, *_: Any) -> None:
        return None

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        agent = manifest["metadata"]["ownerReferences"][0]["name"]
        self.secrets_sent.setdefault(agent, []).append(manifest["data"])
        return self._stored(manifest)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self._stored(manifest)

    async def apply_status(self, namespace: str, name: str, status: Any, resource_version: Any = None) -> Any:
        self.status_writes.setdefault(name, []).append(status)
        self.versions += 1
        written = agent(name)
        return {**written, "metadata": {**written["metadata"], "resourceVersion": str(self.versions)}, "status": status}

    async def post_event(self, *_: Any) -> None:
        return None


def agent(name: str) -> dict[str, Any]:
    body = served("minimal", uid=f"uid-{name}")
    body["metadata"]["name"] = name
    return body


def _timer(controller: Controller, key: tuple[str, str]) -> float:
    return controller.queue._timers[key].when() - asyncio.get_running_loop().time()


def test_one_agent_probes_the_lag_the_others_wait_and_all_go_once_it_is_over() -> None:
    async def scenario() -> None:
        api = Api()
        controller = Controller(cast(Kube, api), ControllerSettings())
        keys = [("default", name) for name in ("a", "b", "c")]
        for _, name in keys:
            controller.observe_agent("ADDED", agent(name))
        controller.start_leading()
        await drain(controller)
        assert [await controller.reconcile(key) for key in keys] == ["waiting"] * 3
        for _, name in keys:  # never Stalled: Pending, saying why, written once
            (status,) = api.status_writes[name]
            assert status["phase"] == "Pending"
            assert "waiting for the API server to recognise kind EnterpriseAgent" in status["message"]
            stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
            assert stalled["status"] == "False"
        # The first is the probe, tried again in seconds; the others only on their own, much later.
        assert _timer(controller, keys[0]) <= 2.0
        assert 10.0 < _timer(controller, keys[1]) <= 20.0
        assert 10.0 < _timer(controller, keys[2]) <= 20.0
        assert await controller.reconcile(keys[0]) == "waiting"
        assert len(api.status_writes["a"]) == 1  # nothing new to say: not written again
        first, again = api.secrets_sent["a"]
        assert first == again  # the same keys sent again, not made anew on every try

        api.lagging = False  # the API server's discovery has refreshed
        assert await controller.reconcile(keys[0]) != "waiting"
        assert "waiting for the API server" not in api.status_writes["a"][-1]["message"]
        assert await drain(controller) >= {keys[1], keys[2]}  # the rest go at once
        assert [await controller.reconcile(key) for key in keys[1:]] != ["waiting"] * 2

    asyncio.run(scenario())


def test_a_lag_that_outlasts_the_api_servers_refreshes_is_reported_as_a_refusal() -> None:
    async def scenario() -> None:
        api = Api()
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000))
        key = ("default", "a")
        controller.observe_agent("ADDED", agent("a"))
        controller.start_leading()
        await drain(controller)
        assert await controller.reconcile(key) == "waiting"
        controller.records[key].discovery_wait_since = time.monotonic() - 91  # refused for 91 s
        assert await controller.reconcile(key) == "stalled"
        status = api.status_writes["a"][-1]
        stalled = next(c for c in status["conditions"] if c["type"] == "Stalled")
        assert (stalled["status"], stalled["reason"]) == ("True", "Forbidden")
        assert "cannot find RESTMapping" in status["message"]

    asyncio.run(scenario())


def test_another_403_is_a_refusal_at_once() -> None:
    async def scenario() -> None:
        api = Api()
        quota = json.dumps({"kind": "Status", "code": 403, "message": 'secrets "a-keys" is forbidden: exceeded quota'})

        async def refused(manifest: dict[str, Any]) -> dict[str, Any]:
            raise KubeError(403, "Forbidden", quota)

        api.create = refused  # type: ignore[method-assign]
        controller = Controller(cast(Kube, api), ControllerSettings(backoff_base_seconds=1000))
        controller.observe_agent("ADDED", agent("a"))
        controller.start_leading()
        await drain(controller)
        assert await controller.reconcile(("default", "a")) == "stalled"
        assert "exceeded quota" in api.status_writes["a"][-1]["message"]

    asyncio.run(scenario())

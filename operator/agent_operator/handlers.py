"""Thin kopf handlers: every watch event lands in the controller's caches and queues the agent.

kopf keeps the watch streams alive (reconnects, resumes, timeouts); the reconcile itself is the
controller's, level-based, the same for every trigger.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import kopf

from agent_operator.controller import Controller
from agent_operator.kinds import AGENT, WATCHED_BY_LABEL, Kind
from agent_operator.kube import login
from agent_operator.kubeconfig import forget_plugin_credentials
from agent_operator.render.common import LABEL_MANAGED_BY, MANAGER
from agent_operator.spec import GROUP


def build_registry(controller: Controller) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    given: list[str | None] = []  # the token kopf was last given

    @kopf.on.login(registry=registry)
    def kopf_login(**_: Any) -> kopf.ConnectionInfo:
        # kopf logs in again only once the API server refused what it had (or it expired): the
        # credential plugin's answer holding that token is not kept. (In kopf's thread pool: a
        # plugin may take seconds.)
        if given:
            forget_plugin_credentials(given[-1])
        info = login()
        given[:] = [info.token]
        return info

    # async handlers run on the event loop; sync ones would run in kopf's thread pool, where the
    # controller's caches and asyncio queue must not be touched.
    @kopf.on.event(AGENT.group, AGENT.version, AGENT.plural, registry=registry)
    async def agent_event(*, event: kopf.RawEvent, **_: Any) -> None:
        controller.observe_agent(event.get("type"), event["object"])

    # Children (and our Services' EndpointSlices), by our managed-by label, so a hand edit or
    # delete is repaired.
    for kind in WATCHED_BY_LABEL:

        @kopf.on.event(
            kind.group,
            kind.version,
            kind.plural,
            labels={LABEL_MANAGED_BY: MANAGER},
            registry=registry,
            id=f"child-{kind.plural}",
        )
        async def child_event(*, event: kopf.RawEvent, **_: Any) -> None:
            controller.observe_child(event.get("type"), event["object"])

    return registry


def configure(settings: kopf.OperatorSettings) -> None:
    """Watch timeouts so a silently dead watch is noticed and replaced."""
    settings.watching.server_timeout = 300  # the API server ends each watch after this
    settings.watching.client_timeout = 330  # and we give up on a stream that went quiet
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.posting.enabled = False  # the controller posts its own Events, on transitions only
    settings.peering.standalone = True  # leader election is ours (Lease), not kopf peering
    settings.persistence.finalizer = f"{GROUP}/kopf-finalizer"  # unused: no handler needs one
    settings.persistence.diffbase_storage = NoDiffBase()
    # kopf's per-object worker holds the object's last event (the whole body, managedFields and
    # all) until it has idled this long; our handler has copied what it needs at once, so a
    # rollout of many agents need not hold seconds' worth of bodies (kopf's default is 5 s).
    settings.queueing.idle_timeout = 0.5
    # The API server filters the children's watches and lists by our label: without it every
    # Secret, ConfigMap and EndpointSlice in the cluster would stream through (and be parsed on)
    # the loop that renews the Lease, only to be dropped by the handler's label filter.
    for kind in WATCHED_BY_LABEL:
        settings.watching.label_selectors[_same_resource(kind)] = f"{LABEL_MANAGED_BY}={MANAGER}"


class NoDiffBase(kopf.DiffBaseStorage):
    """Our handlers are event handlers: nothing compares an object with its last handled state.
    kopf still builds that state (a deep copy of the body, then a diff with the stored one) for
    every event of every watched object unless the storage says it is empty: 14 % of the
    operator's CPU at 1,000 agents (py-spy, bench/operator.py). Nothing is stored on objects.
    A change-detecting handler (on.create, on.update, on.resume, on.field) or a daemon would need
    kopf's own storage back: with no stored state, every event would look like a creation."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None  # called only after change-detecting handlers (on.create, on.update): none here


def _same_resource(kind: Kind) -> Callable[[kopf.Resource], bool]:
    def same(resource: kopf.Resource) -> bool:
        return resource.group == kind.group and resource.plural == kind.plural

    return same

"""The controller: watch caches, a coalescing work queue, and the reconcile loop around the pure core.

kopf delivers watch events (handlers.py); they land in in-memory caches and put the owning agent
on a queue. Workers take one agent at a time, so two reconciles of the same agent never overlap,
and a burst of events for one agent becomes a single reconcile (as client-go's workqueue does).
Only the replica holding the leader Lease runs workers; the standby keeps its caches warm.

The Secrets and ConfigMaps agents reference (not ours, so without our label) are watched here,
metadata only, and every event is dropped unless an agent references the object; a change to one
queues the agents that reference it, whose reconcile reads it by name (once per version while the
watch is live; on every reconcile while it is not).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar, cast

import orjson

from agent_contract.keyfiles import new_key_files
from agent_operator import defaults, metrics, rollout, timefmt, undo
from agent_operator import reconcile as core
from agent_operator.analysis import HttpAnalysis
from agent_operator.conditions import Reason
from agent_operator.kinds import AGENT, ENDPOINT_SLICE, WATCHED_BY_LABEL, Kind
from agent_operator.kube import Kube, KubeError
from agent_operator.manifest import FieldError
from agent_operator.namespaces import WatchedNamespaces
from agent_operator.render.common import (
    ANNOTATION_ROTATE_KEYS,
    ANNOTATION_UNDO,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    MANAGER,
    json_bytes,
    key_secret_name,
)
from agent_operator.render.history import controller_revision_name_for
from agent_operator.render.keys import ANNOTATION_ROTATED_FOR, build_key_secret
from agent_operator.render.references import Found, ObjectKey, Reference, referenced_objects
from agent_operator.spec import KIND, EnterpriseAgent, Phase, UndoResult, UndoStatus, read_status

log = logging.getLogger("agent_operator")

AgentKey = tuple[str, str]  # (namespace, name)
RefKey = tuple[str, str, str]  # (namespace, kind, name) of a referenced Secret or ConfigMap
NameKey = tuple[str, str, str, str]  # (namespace, apiVersion, kind, name) of an object a child may be
# The kinds agents reference by name; their objects are not ours and carry no label of ours.
REFERENCED_KINDS = ("Secret", "ConfigMap")
REFERENCE_WATCH_SECONDS = 300  # the API server ends each reference watch after this
# The children's kinds whose names are watched (see Controller._watch_names): those whose objects
# do not change once written, so the watch carries little more than their creations. Not the
# Deployments, PodDisruptionBudgets and HorizontalPodAutoscalers, whose status changes with every
# pod (their names are read: one GET each for a new agent, cheaper than every status event of
# every such object in the cluster); not the Secrets: the key Secret, our only one, is created
# (POST), which fails with 409 on a name taken, and Secrets are what a cluster holds most of.
NAME_WATCHED_KINDS = tuple(
    kind
    for kind in WATCHED_BY_LABEL
    if kind.kind in {"Service", "ConfigMap", "ServiceAccount", "NetworkPolicy", "ControllerRevision"}
)
_RENAME = "rename the agent or delete that object"
# What a measurement was taken for: the checks' targets, the spec's generation and the revision.
MeasureRequest = tuple[core.Measure, int, str | None]
MEASUREMENTS_AT_ONCE = 32  # concurrent rollout analyses (each a few HTTP calls)
COMPONENT = "enterprise-agent-operator"


class NotLeadingError(Exception):
    """A write was about to happen after this replica stopped leading."""


class WorkQueue:
    """A deduplicating queue: a key is queued at most once and processed by one worker at a time."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._dirty: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._since: dict[Hashable, float] = {}  # when each dirty key was queued

    def add(self, key: Hashable) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        self._since[key] = time.monotonic()
        if key not in self._processing:
            self._queue.put_nowait(key)
        metrics.QUEUE_DEPTH.set(len(self._dirty))

    def add_after(self, key: Hashable, delay: float) -> None:
        """Queues ``key`` after ``delay``, keeping only the earliest timer per key (as client-go's
        delaying queue does): retries of an agent that stays refused must not multiply."""
        loop = asyncio.get_running_loop()
        pending = self._timers.get(key)
        if pending is not None and pending.when() <= loop.time() + delay:
            return
        if pending is not None:
            pending.cancel()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._processing.add(key)
        self._dirty.discard(key)
        queued = self._since.pop(key, None)
        if queued is not None:
            metrics.QUEUE_WAIT.observe(time.monotonic() - queued)
        metrics.QUEUE_DEPTH.set(len(self._dirty))
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:  # it changed while we worked on it: go again
            self._queue.put_nowait(key)

    def __len__(self) -> int:
        return len(self._dirty)


@dataclass(frozen=True)
class ControllerSettings:
    operator_namespace: str = defaults.OPERATOR_NAMESPACE
    workers: int = defaults.WORKERS
    resync_seconds: float = defaults.RESYNC_SECONDS
    # Backoff for failed reconciles and for references we do not watch (a missing users Secret).
    backoff_base_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    child_event_delay_seconds: float = 1.0
    # The API server's discovery lag (``discovery_lag``): how often one waiting agent tries again,
    # how often each of the others does on its own, and for how long before it counts as a refusal.
    discovery_retry_seconds: float = 2.0
    discovery_fallback_seconds: float = 20.0
    discovery_wait_seconds: float = 90.0
    # Where the rollout analysis sends its HTTP checks (None: Service DNS and pod IPs in-cluster).
    analysis_base_url: str | None = None


@dataclass
class AgentRecord:
    """Everything the controller keeps for one agent: the watch caches and the reconcile's memo."""

    body: dict[str, Any] | None = None  # None: children seen before their agent
    children: KeptAsJson[core.ChildKey] = field(default_factory=lambda: KeptAsJson[core.ChildKey]())
    endpoint_slices: KeptAsJson[str] = field(default_factory=lambda: KeptAsJson[str]())
    memo: core.Memo = field(default_factory=core.Memo)
    failures: int = 0  # consecutive failed (or Stalled) reconciles: the backoff exponent
    generation_seen_at: dict[int, float] = field(default_factory=dict)  # for apply-to-Ready latency
    # resourceVersions of the agent that our own status writes replaced. A watch event still in
    # flight for one of them is older than the cache and must not rewind the state machine.
    superseded: deque[str] = field(default_factory=lambda: deque(maxlen=32))
    references: frozenset[RefKey] = frozenset()  # the Secrets and ConfigMaps its spec names
    undo_event: tuple[str, str, str] | None = None  # the answer to an undo request, not posted yet
    discovery_wait_since: float | None = None  # refused for the API server's discovery lag since
    # The key Secret made for this agent and not created yet: the same keys are sent again, not
    # made anew on every retry (an RSA key takes a while, on the loop).
    unsent_keys: tuple[tuple[str, str], dict[str, str]] | None = None


class Controller:
    def __init__(self, kube: Kube, settings: ControllerSettings) -> None:
        self.kube = kube
        self.settings = settings
        self.queue = WorkQueue()
        self.records: dict[AgentKey, AgentRecord] = {}
        # Counted when scraped: counting on each agent event walked every record (1 % of the CPU
        # at 1,000 agents, and growing with the square of their number).
        metrics.AGENTS_MANAGED.set_function(self.agent_count)
        self.analysis = HttpAnalysis(settings.analysis_base_url)
        self.leading = asyncio.Event()
        self.last_heartbeat = time.monotonic()
        self._last_resync = 0.0
        self._namespaces = WatchedNamespaces()
        self._change_count = 0
        self._write_until = math.inf  # set by the elector's renewals; a controller without one is unbounded
        self._touched: dict[Hashable, int] = {}
        self._in_flight: set[asyncio.Task[str]] = set()
        self._measurements: dict[AgentKey, tuple[MeasureRequest, asyncio.Task[list[rollout.Check]]]] = {}
        self._measuring = asyncio.Semaphore(MEASUREMENTS_AT_ONCE)
        # Agents refused for the API server's discovery lag: one (the probe) tries again every few
        # seconds, the rest are queued together once it gets through (see _wait_for_discovery).
        self._awaiting_discovery: set[AgentKey] = set()
        self._discovery_probe: AgentKey | None = None
        # Referenced objects -> the agents that reference them, and the resourceVersion last seen
        # of each (None: not there). Only referenced objects have entries; nothing else is kept.
        self._referrers: dict[RefKey, set[AgentKey]] = {}
        self._reference_versions: dict[RefKey, str | None] = {}
        # What the last read of each referenced object found (its version, and the object without
        # its metadata's extras), used again while the watch of its kind and namespace is live and
        # shows no other version: an unchanged object is not read again on every reconcile of every
        # agent that references it. (kind, scope) of each watch listed and running.
        self._reference_reads: dict[RefKey, tuple[str | None, dict[str, Any] | None]] = {}
        self._live_reference_watches: set[tuple[str, str | None]] = set()
        # The (namespace, name) of every object of our children's kinds (but Secrets: see
        # NAME_WATCHED_KINDS), ours or not, by (kind, scope) of the watch that lists them: a child
        # whose name is in none is made without a read (see _foreign_objects).
        self._taken_names: dict[tuple[str, str | None], set[tuple[str, str]]] = {}
        self._live_name_watches: set[tuple[str, str | None]] = set()

    def _record(self, key: AgentKey) -> AgentRecord:
        return self.records.setdefault(key, AgentRecord())

    def agent_count(self) -> int:
        return sum(1 for record in self.records.values() if record.body is not None)

    # --- watch events -----------------------------------------------------------------------------

    def observe_agent(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if not self._watched(body):
            return  # a glob's watches run across the cluster (WatchedNamespaces.watch_clusterwide)
        body = _slim(body)
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        self._touch(("agent", *key))
        cached = self.records.get(key)
        if event_type == "DELETED":
            # Only the agent we know: a DELETED of an older agent of the same name (recreated in a
            # watch gap) must not drop the new one.
            if cached is not None and (cached.body is None or _uid(cached.body) == _uid(body)):
                self._index_references(key, [])
                self.records.pop(key, None)
                metrics.forget_phase(*key)
                self._forget_measurement(key)
        else:
            record = self._record(key)
            if _uid(record.body) == _uid(body) and _older(body, record.body, record.superseded):
                return  # older than what our own write or read already put in the cache
            record.body = body
            generation = body["metadata"].get("generation", 0)
            record.generation_seen_at.setdefault(generation, time.monotonic())
            self.queue.add(key)

    def observe_child(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        if not self._watched(body):
            return
        body = _without_managed_fields(body)
        metadata = body["metadata"]
        owner = metadata.get("labels", {}).get(LABEL_INSTANCE)
        if not owner:
            return
        self._touch(_child_identity(body))
        key = (metadata["namespace"], owner)
        if event_type == "DELETED" and key not in self.records:
            return  # a child of a deleted agent, going with it: nothing to forget
        record = self._record(key)
        cache: KeptAsJson[Any] = (
            record.endpoint_slices if body["kind"] == ENDPOINT_SLICE.kind else record.children
        )  # EndpointSlices are not children: never compared, never deleted
        cache_key = metadata["name"] if cache is record.endpoint_slices else core.child_key(body)
        cached = cache.get(cache_key)
        if event_type == "DELETED":
            if _uid(cached) in (None, _uid(body)):  # not a newer one of that name
                cache.pop(cache_key, None)
        elif not (cached is not None and _uid(cached) == _uid(body) and _older(body, cached)):
            cache[cache_key] = body
        if record.body is None and not record.children and not record.endpoint_slices:
            del self.records[key]  # children seen before (or after) their agent, all gone now
            return
        if record.body is not None:
            # A rollout brings bursts of child status events; waiting a moment folds each burst
            # into one reconcile (and one status write) instead of one per event.
            self.queue.add_after(key, self.settings.child_event_delay_seconds)

    # --- names taken -----------------------------------------------------------------------------

    def listed_names(self, kind: str, scope: str | None, items: list[dict[str, Any]]) -> None:
        self._taken_names[(kind, scope)] = {
            (sys.intern(str(item["metadata"].get("namespace") or "")), str(item["metadata"].get("name") or ""))
            for item in items
        }

    def observe_name(self, kind: str, scope: str | None, event_type: str, obj: Mapping[str, Any]) -> None:
        metadata = obj.get("metadata") or {}
        namespace = str(metadata.get("namespace") or "")
        if not self._namespaces.covers(namespace):
            return
        names = self._taken_names.setdefault((kind, scope), set())
        if event_type == "DELETED":
            names.discard((namespace, str(metadata.get("name") or "")))
        else:
            names.add((sys.intern(namespace), str(metadata.get("name") or "")))

    def _known_free(self, name: NameKey) -> bool:
        """Whether no object has that name: the watch of its kind's names is live (listed, and not
        broken or silent since) and has not shown it. An object made a moment ago that the watch
        has not shown yet is missed, as one made between a read and the write after it would be."""
        namespace, _, kind, object_name = name
        for scope in (None, namespace):
            if (kind, scope) in self._live_name_watches:
                return (namespace, object_name) not in self._taken_names.get((kind, scope), ())
        return False

    # --- referenced Secrets and ConfigMaps ------------------------------------------------------------

    def _index_references(self, key: AgentKey, refs: list[Reference]) -> None:
        """Records which objects the agent's spec references, so a change to one queues it."""
        record = self.records.get(key)
        wanted = frozenset((key[0], ref.kind, ref.name) for ref in refs) if record is not None else frozenset()
        before = record.references if record is not None else frozenset()
        if record is not None:
            record.references = wanted
        for ref in before - wanted:
            referrers = self._referrers.get(ref, set())
            referrers.discard(key)
            if not referrers:
                self._referrers.pop(ref, None)
                self._reference_versions.pop(ref, None)
                self._reference_reads.pop(ref, None)
        for ref in wanted - before:
            self._referrers.setdefault(ref, set()).add(key)

    def observe_reference(self, kind: str, event_type: str | None, obj: Mapping[str, Any]) -> None:
        """A watch event of a Secret or ConfigMap (metadata only). Dropped, never stored, unless an
        agent references the object; then its agents are queued, once per resourceVersion."""
        metadata = obj.get("metadata") or {}
        ref = (str(metadata.get("namespace") or ""), kind, str(metadata.get("name") or ""))
        if ref in self._referrers:
            self._reference_seen(ref, None if event_type == "DELETED" else _resource_version(obj))

    def _reference_seen(self, ref: RefKey, version: str | None) -> None:
        """The referenced object is at ``version`` (None: gone). A version not seen before (from a
        watch event, a list or the reconcile's own read) queues the agents that reference it."""
        referrers = self._referrers.get(ref)
        if referrers is None or (ref in self._reference_versions and self._reference_versions[ref] == version):
            return
        self._reference_versions[ref] = version
        for key in referrers:
            self.queue.add(key)

    def listed_references(self, kind: str, scope: str | None, items: list[dict[str, Any]]) -> None:
        """A list of ``kind`` in ``scope`` (None: every namespace): what changed or vanished since
        it was last seen queues its agents, as a relist does for the other caches."""
        listed = {
            (str(item["metadata"].get("namespace") or ""), kind, str(item["metadata"].get("name") or "")): item
            for item in items
        }
        for ref in list(self._referrers):
            if ref[1] == kind and (scope is None or ref[0] == scope):
                found = listed.get(ref)
                self._reference_seen(ref, _resource_version(found) if found is not None else None)

    def _referenced(self, kind: str) -> Callable[[Mapping[str, Any]], bool]:
        def referenced(metadata: Mapping[str, Any]) -> bool:
            return (metadata.get("namespace", ""), kind, metadata.get("name", "")) in self._referrers

        return referenced

    async def _watch_references(self, kind: str, scope: str | None) -> None:
        """Lists, then watches, the metadata of every ``kind`` in ``scope``, as an informer does,
        but keeps only the referenced ones' resourceVersions: the API server sends no data (see
        Kube.watch_metadata) and what is not referenced is dropped as it arrives, so thousands of
        unrelated Secrets cost their metadata passing through, not memory."""
        await self._list_then_watch(
            ("v1", kind, scope),
            self._referenced(kind),
            lambda items: self.listed_references(kind, scope, items),
            lambda event_type, obj: self.observe_reference(kind, event_type, obj),
            self._live_reference_watches,
        )

    async def _watch_names(self, kind: Kind, scope: str | None) -> None:
        """Lists, then watches, the names of the objects of a child's kind in ``scope``, ours or not
        (metadata only), so that a child the caches do not hold needs no read to know its name is
        free (see _foreign_objects). Ours come on this watch too: one ordered stream says what
        exists, where two (ours by label, the rest by the opposite label) could both miss an
        object whose label changes, between their events."""
        await self._list_then_watch(
            (kind.api_version, kind.kind, scope),
            lambda metadata: self._namespaces.covers(str(metadata.get("namespace") or "")),
            lambda items: self.listed_names(kind.kind, scope, items),
            lambda event_type, obj: self.observe_name(kind.kind, scope, event_type, obj),
            self._live_name_watches,
        )

    async def _list_then_watch(
        self,
        what: tuple[str, str, str | None],
        keep: Callable[[Mapping[str, Any]], bool],
        listed: Callable[[list[dict[str, Any]]], None],
        observe: Callable[[str, dict[str, Any]], None],
        live_watches: set[tuple[str, str | None]],
    ) -> None:
        """The list-then-watch loop of a metadata-only informer over (apiVersion, kind, scope):
        ``listed`` takes each list, ``observe`` each event. (kind, scope) is in ``live_watches``
        while the watch runs from a list; whoever trusts the watch reads instead when it is not.
        Lists again after a 410 or a broken watch."""
        api_version, kind, scope = what
        delay = self.settings.backoff_base_seconds
        live = (kind, scope)
        while True:
            try:
                items, version = await self.kube.list_metadata(api_version, kind, scope, keep)
                listed(items)
                live_watches.add(live)
                while True:  # each watch ends after REFERENCE_WATCH_SECONDS; go on from where it was
                    started = time.monotonic()
                    events = self.kube.watch_metadata(api_version, kind, scope, version, REFERENCE_WATCH_SECONDS)
                    async for event_type, obj in events:
                        version = _resource_version(obj) or version
                        if event_type != "BOOKMARK":
                            observe(event_type, obj)
                    if time.monotonic() - started < 1.0:  # ended at once (a proxy?): no hot loop
                        await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter, not crypto
                        delay = min(self.settings.backoff_max_seconds, delay * 2)
                    else:
                        delay = self.settings.backoff_base_seconds
            except Exception as error:
                # Until it is listed again, what trusted the watch reads instead (events may be lost).
                live_watches.discard(live)
                if isinstance(error, KubeError) and error.status == 410:
                    continue  # the version is too old: list again at once
                if isinstance(error, KubeError):
                    log.warning("watch of %ss in %s failed: %s", kind, scope or "all namespaces", error)
                else:  # never let this task end: without it no change it watches is seen
                    log.exception("watch of %ss in %s crashed", kind, scope or "all namespaces")
                await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter, not crypto
                delay = min(self.settings.backoff_max_seconds, delay * 2)
            except BaseException:
                live_watches.discard(live)
                raise

    async def _read_references(self, namespace: str, refs: list[Reference]) -> Found:
        """Each referenced object: as last read when its watch is live and has shown no other
        version since, else read by name (one GET). A read's version is kept only for an object the
        watch has not shown yet, so the watch's event for this version queues nothing more. A
        version the watch has shown is never replaced by a read: another agent may reference the
        object too, and the watch's event for the version this agent read first must still queue
        that one (and a read may be older than the event already taken)."""
        keys: list[ObjectKey] = sorted({ref.object_key for ref in refs})
        objects = await asyncio.gather(*(self._read_reference((namespace, kind, name)) for kind, name in keys))
        return dict(zip(keys, objects, strict=True))

    async def _read_reference(self, ref: RefKey) -> dict[str, Any] | None:
        namespace, kind, name = ref
        last = self._reference_reads.get(ref)
        live = {(kind, None), (kind, namespace)} & self._live_reference_watches
        if last is not None and live and ref in self._reference_versions and self._reference_versions[ref] == last[0]:
            return last[1]
        obj = await self.kube.find("v1", kind, namespace, name)
        kept = _referenced_content(obj) if obj is not None else None
        if ref in self._referrers:  # still referenced after the read: nothing kept of what is not
            version = _resource_version(obj) if obj is not None else None
            self._reference_versions.setdefault(ref, version)
            self._reference_reads[ref] = (version, kept)
        return kept

    def _touch(self, identity: Hashable) -> None:
        """Notes that the cache entry changed (an event, a write's response): a relist in flight
        must not overwrite or drop it with what it listed before."""
        self._change_count += 1
        self._touched[identity] = self._change_count

    def _store_child(self, children: KeptAsJson[core.ChildKey], obj: Mapping[str, Any]) -> dict[str, Any]:
        slim = _without_managed_fields(obj)
        children[core.child_key(slim)] = slim  # fresher than the watch; the event follows
        self._touch(_child_identity(slim))
        return slim

    async def prime(self, namespaces: WatchedNamespaces) -> None:
        """Lists agents and children once before any reconcile (as an informer syncs its cache),
        so the first reconcile after a start sees existing children and writes nothing needless.
        The first periodic resync comes a full period after it (see _resync for the list between)."""
        self._namespaces = namespaces
        await self.relist()
        self._last_resync = time.monotonic()

    async def relist(self) -> None:
        """Lists everything we watch and makes the caches agree, as an informer's relist does:
        what the list lacks is forgotten, what the caches lack is added, what differs is updated.
        kopf's watches relist after a 410 (an API server restart, a long disconnect) without
        DELETED events for objects deleted in the gap; without this, a child deleted then would
        stay in the cache, never be recreated, and its agent would stay Ready. An entry that
        changed while the lists were in flight (an event, our own write) is newer than the list
        and left alone, in both directions."""
        listed_at = self._change_count
        agents, children = [], []
        for scope in self._scopes():
            agents += await self.kube.list(AGENT.api_version, AGENT.kind, scope)
            for kind in WATCHED_BY_LABEL:
                self.last_heartbeat = time.monotonic()  # slow lists are not a stuck loop
                children += await self.kube.list(kind.api_version, kind.kind, scope, f"{LABEL_MANAGED_BY}={MANAGER}")
        listed_agents = {(a["metadata"]["namespace"], a["metadata"]["name"]): a for a in agents if self._watched(a)}
        listed = {_child_identity(c): c for c in children if self._watched(c)}

        def untouched(identity: Hashable) -> bool:
            return self._touched.get(identity, 0) <= listed_at

        watched = {(k.api_version, k.kind) for k in WATCHED_BY_LABEL}  # a ServiceMonitor is never listed
        for key, record in list(self.records.items()):
            body = record.body
            if body is not None and untouched(("agent", *key)):
                agent = listed_agents.get(key)
                if agent is None or _uid(agent) != _uid(body):
                    self.observe_agent("DELETED", body)
                elif _resource_version(agent) != _resource_version(body):
                    self.observe_agent(None, agent)
            for child in [*record.children.values(), *record.endpoint_slices.values()]:
                identity = _child_identity(child)
                if (child["apiVersion"], child["kind"]) in watched and untouched(identity):
                    found = listed.get(identity)
                    if found is None or _uid(found) != _uid(child):
                        self.observe_child("DELETED", child)
        for key, agent in listed_agents.items():
            known = self.records.get(key)
            if untouched(("agent", *key)) and (known is None or known.body is None):
                self.observe_agent(None, agent)
        for identity, child in listed.items():
            owner = (child["metadata"].get("labels") or {}).get(LABEL_INSTANCE)
            holder = self.records.get((child["metadata"]["namespace"], owner or ""))
            cached = _cached(holder, child) if holder is not None else None
            if untouched(identity) and (cached is None or _resource_version(cached) != _resource_version(child)):
                self.observe_child(None, child)
        self._touched = {identity: count for identity, count in self._touched.items() if count > listed_at}

    def _scopes(self) -> list[str | None]:
        return self._namespaces.list_scopes()

    def _watched(self, obj: Mapping[str, Any]) -> bool:
        return self._namespaces.covers(obj["metadata"].get("namespace", ""))

    # --- running ----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        workers = [asyncio.create_task(self._worker(), name=f"worker-{i}") for i in range(self.settings.workers)]
        resync = asyncio.create_task(self._resync(), name="resync")
        references = [
            asyncio.create_task(self._watch_references(kind, scope), name=f"references-{kind}-{scope or 'all'}")
            for kind in REFERENCED_KINDS
            for scope in self._scopes()
        ] + [
            asyncio.create_task(self._watch_names(kind, scope), name=f"names-{kind.kind}-{scope or 'all'}")
            for kind in NAME_WATCHED_KINDS
            for scope in self._scopes()
        ]
        try:
            await stop.wait()
        finally:
            for task in [*workers, resync, *references]:
                task.cancel()
            await asyncio.gather(*workers, resync, *references, return_exceptions=True)

    def enqueue_all(self) -> None:
        for key, record in list(self.records.items()):
            if record.body is not None:
                self.queue.add(key)

    async def _resync(self) -> None:
        """Level-based safety net: every agent is reconciled periodically even with no events.
        One list comes a few seconds after the start, queueing only what differs: an object
        deleted between prime()'s lists and the start of kopf's watches has no DELETED event, and
        would otherwise stay in the cache (a child not recreated) until the first resync."""
        caught_up = False
        while True:
            self.last_heartbeat = time.monotonic()
            await asyncio.sleep(min(self.settings.resync_seconds, 5.0))
            self.last_heartbeat = time.monotonic()
            due = time.monotonic() - self._last_resync >= self.settings.resync_seconds
            if due or not caught_up:
                caught_up = True
                if due:
                    self._last_resync = time.monotonic()
                try:
                    await self.relist()
                except KubeError as error:  # the watches still run; the next resync lists again
                    log.warning("relist failed: %s", error)
                if due and self.leading.is_set():
                    self.enqueue_all()
                    metrics.RESYNCS.inc()

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            assert isinstance(key, tuple)
            try:
                # Leadership is checked after taking the key, not before: a worker that waited in
                # the queue across a step-down must not reconcile for a leader that is gone.
                await self.leading.wait()
                await self._reconcile_while_leading(key)
            finally:
                self.queue.done(key)

    async def _reconcile_while_leading(self, key: AgentKey) -> None:
        started = time.perf_counter()
        result = "error"
        # Its own task, so a step-down cancels it wherever it is (an analysis may take minutes)
        # and nothing it computed before the takeover is written after it.
        task = asyncio.create_task(self.reconcile(key), name=f"reconcile-{key[0]}/{key[1]}")
        self._in_flight.add(task)
        try:
            result = await task
            if result != "stalled" and key in self.records:
                # A Stalled agent waiting on a reference keeps its backoff growing.
                self.records[key].failures = 0
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                task.cancel()
                raise  # the worker itself is stopping
            result = "cancelled"
            self.queue.add(key)  # leadership was lost mid-reconcile: whoever leads next does it
        except NotLeadingError:
            result = "cancelled"
            self.queue.add(key)
        except KubeError as error:
            metrics.RECONCILE_ERRORS.labels(reason=f"api_{error.status}").inc()
            log.warning("reconcile of %s/%s failed: %s", *key, error)
            self._retry_later(key)
        except Exception:
            metrics.RECONCILE_ERRORS.labels(reason="exception").inc()
            log.exception("reconcile of %s/%s crashed", *key)
            self._retry_later(key)
        finally:
            self._in_flight.discard(task)
            metrics.RECONCILE_DURATION.labels(result=result).observe(time.perf_counter() - started)

    def _measured(
        self, key: AgentKey, request: MeasureRequest, agent: EnterpriseAgent, key_data: Mapping[str, str]
    ) -> list[rollout.Check] | None:
        """The checks measured for exactly this request, or None while they are measured. An
        analysis may take minutes (a smoke call may be given 600 s): it runs beside the workers,
        not in one, so slow analyses never hold the workers that repair drift for other agents."""
        measure, generation, revision = request
        baseline = None if measure.baseline_pod_ips is None else tuple(sorted(measure.baseline_pod_ips))
        request = (
            replace(measure, pod_ips=tuple(sorted(measure.pod_ips)), baseline_pod_ips=baseline),
            generation,
            revision,
        )
        current = self._measurements.get(key)
        if current is not None and not current[1].done():
            if current[0][1:] == request[1:]:
                return None  # under way for this revision: let it finish, even if the pods moved
            current[1].cancel()  # measured for a revision that is no longer wanted
        elif current is not None and current[0] == request:
            del self._measurements[key]
            error = current[1].exception()
            if error is not None:  # logged and retried with backoff by the worker, not at once
                raise MeasurementError(f"the analysis of {key[0]}/{key[1]} failed: {error!r}") from error
            return current[1].result()
        task = asyncio.create_task(self._measure(key, agent, request[0], key_data), name=f"measure-{key[1]}")
        self._measurements[key] = (request, task)
        return None

    async def _measure(
        self, key: AgentKey, agent: EnterpriseAgent, measure: core.Measure, key_data: Mapping[str, str]
    ) -> list[rollout.Check]:
        try:
            async with self._measuring:
                return await self.analysis.measure(
                    agent, measure.service, measure.pod_ips, key_data, measure.baseline_pod_ips
                )
        finally:
            self.queue.add(key)

    def _forget_measurement(self, key: AgentKey) -> None:
        measuring = self._measurements.pop(key, None)
        if measuring is not None:
            measuring[1].cancel()

    def start_leading(self) -> None:
        self.leading.set()
        self.enqueue_all()

    def stop_leading(self) -> None:
        """Stops every write at once: reconciles in flight are cancelled, and a write that is
        already past its check finds ``leading`` clear at the next one (``_fence``)."""
        self.leading.clear()
        for task in [*self._in_flight, *(task for _, task in self._measurements.values())]:
            task.cancel()
        self._measurements.clear()

    def lease_renewed(self, write_until: float) -> None:
        self._write_until = write_until

    def _fence(self) -> None:
        """Before every write: we lead, and by our own clock the lease we renewed still covers us
        (a process frozen past it writes nothing before the elector notices)."""
        if not self.leading.is_set() or time.monotonic() >= self._write_until:
            raise NotLeadingError

    def _retry_later(self, key: AgentKey) -> None:
        """Capped exponential backoff with full jitter: no hot loop on one bad agent."""
        record = self.records.get(key)
        if record is None:
            return
        record.failures += 1
        ceiling = min(self.settings.backoff_max_seconds, self.settings.backoff_base_seconds * 2**record.failures)
        self.queue.add_after(key, random.uniform(ceiling / 2, ceiling))  # noqa: S311 - jitter, not crypto

    async def _wait_for_discovery(
        self, key: AgentKey, body: Mapping[str, Any], observed: core.Observed, now: datetime, error: KubeError
    ) -> str | None:
        """Waits out the API server's discovery lag (``discovery_lag``) without Stalled and without
        backoff. One waiting agent, the probe, tries again every few seconds; the others only now
        and then on their own, and all together once the probe gets through: a CRD applied with a
        thousand agents must not cost a thousand agents' refused writes every few seconds. None
        when the refusal is another one, or has lasted past several of the API server's refreshes
        (``discovery_wait_seconds``): it is then reported as any 403 is."""
        record = self.records.get(key)
        if record is None:
            return None
        if not discovery_lag(error):
            record.discovery_wait_since = None  # a wait is a run of such refusals, nothing between
            return None
        started = record.discovery_wait_since = record.discovery_wait_since or time.monotonic()
        if time.monotonic() - started > self.settings.discovery_wait_seconds:
            self._awaiting_discovery.discard(key)
            return None
        log.info("%s/%s: the API server does not map %s yet (a new CRD); retrying: %s", *key, AGENT.kind, error)
        if self._discovery_probe is None or self._discovery_probe == key or self._discovery_probe not in self.records:
            self._discovery_probe = key
            self.queue.add_after(key, self.settings.discovery_retry_seconds)
        else:
            self.queue.add_after(key, self.settings.discovery_fallback_seconds)
        self._awaiting_discovery.add(key)
        message = (
            f"waiting for the API server to recognise kind {AGENT.kind} in ownerReferences"
            f" (its CRD was installed moments ago): {error}"
        )
        plan = core.waiting_plan(observed, message, now)
        if plan.status != observed.status:
            await self._finish(body, plan, key)
        return "waiting"

    def _discovery_caught_up(self, key: AgentKey) -> None:
        """``key``'s writes went through: the agents waiting for the API server go now."""
        self.records[key].discovery_wait_since = None
        self._awaiting_discovery.discard(key)
        if self._awaiting_discovery:
            for waiting in self._awaiting_discovery:
                self.queue.add(waiting)
            self._awaiting_discovery.clear()
        self._discovery_probe = None

    # --- one reconcile ----------------------------------------------------------------------------

    async def reconcile(self, key: AgentKey) -> str:
        """Observe, plan (pure), write the plan. The clock is read once, here."""
        record = self.records.get(key)
        body: Mapping[str, Any] | None = record.body if record is not None else None
        if record is None or body is None or body["metadata"].get("deletionTimestamp"):
            return "deleted"  # children go with the agent through their ownerReferences
        annotations = body["metadata"].get("annotations") or {}
        token, before = annotations.get(ANNOTATION_UNDO), read_status(body.get("status"))
        undo_answer = undo.unrecorded_answer(token, before, annotations)
        if undo.pending(token, before, annotations) and before.observed_generation == body["metadata"].get(
            "generation"
        ):
            # Decided on a status that has caught up with the spec; otherwise after the next write.
            undone = await self._undo(key, body, record, str(token))
            if undone is None:
                return "conflict"
            body, undo_answer = undone
        now = timefmt.now()
        uid = body["metadata"]["uid"]
        observed = core.Observed(
            body=body,
            admission=core.admit(body),
            children=_controlled(record.children, uid),
            endpoint_slices=list(record.endpoint_slices.values()),
            undo=undo_answer,
        )
        agent = observed.admission.agent
        refs = referenced_objects(agent) if agent is not None else []
        self._index_references(key, refs)  # before they are read: a change after the read is an event
        if agent is not None:
            found = await self._read_references(agent.namespace, refs)
            missing = core.missing_references(agent, found)
            observed = replace(observed, references=found)
            if missing:
                # The reference watch queues the agent when the object appears; this is the net
                # beneath it (a watch that is down, RBAC that does not allow it).
                self._retry_later(key)
                observed = replace(observed, missing=missing)
            else:
                try:
                    key_secret = await self._ensure_keys(agent, body, record)
                except ForeignKeysError as taken:
                    self._retry_later(key)  # the other object may go (an earlier agent's, collected)
                    conflict = [FieldError("metadata.name", str(taken))]
                    return await self._finish(
                        body, core.stalled_plan(observed, conflict, Reason.NAME_CONFLICT, now), key
                    )
                except KubeError as error:
                    if error.status != 403:
                        raise
                    waiting = await self._wait_for_discovery(key, body, observed, now, error)
                    if waiting is not None:
                        return waiting
                    self._retry_later(key)  # as for any child refused for a reason outside the spec
                    refused = [FieldError("spec", f"Secret {key_secret_name(agent)}: {error}")]
                    return await self._finish(body, core.stalled_plan(observed, refused, Reason.FORBIDDEN, now), key)
                observed = replace(observed, key_secret=key_secret, children=_controlled(record.children, uid))
        checks: list[rollout.Check] | None = None
        plan = self._plan(observed, now, checks, record)
        if plan.measure is None:
            self._forget_measurement(key)
        else:
            assert agent is not None  # a stalled plan measures nothing
            checks = self._measured(key, (plan.measure, observed.generation, plan.revision), agent, observed.key_data)
            if checks is None:
                return "measuring"  # the worker is free; the measurement queues the agent when done
            plan = self._plan(observed, now, checks, record)
        conflicts = await self._foreign_objects(plan.apply, record.children, agent.name if agent else "", uid)
        if conflicts:
            self._retry_later(key)
            return await self._finish(body, core.stalled_plan(observed, conflicts, Reason.NAME_CONFLICT, now), key)
        outcomes = await asyncio.gather(
            *(self._apply(record.children, manifest) for manifest in plan.apply), return_exceptions=True
        )  # every apply has ended before we go on: none runs on after a refusal or a step-down
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        for failure in failures:
            if not isinstance(failure, RefusedError):
                raise failure
        if failures:
            first = cast(RefusedError, failures[0])
            waiting = await self._wait_for_discovery(key, body, observed, now, first.error)
            if waiting is not None:
                return waiting
            if first.error.status in (400, 403, 404, 422):
                # Refused for what the spec produced (400, 422) or for something outside it: a quota,
                # an admission webhook or policy, RBAC, a terminating namespace (403). Any of those may
                # change without the agent changing: say so, and look again later with backoff.
                self._retry_later(key)
                reason = Reason.FORBIDDEN if first.error.status == 403 else Reason.APPLY_FAILED
                return await self._finish(body, core.stalled_plan(observed, [first.field_error()], reason, now), key)
            raise first.error
        self._discovery_caught_up(key)
        for api_version, kind, name in plan.delete:
            self._fence()
            await self.kube.delete(api_version, kind, body["metadata"]["namespace"], name)
            record.children.pop((api_version, kind, name), None)
            self._touch(("child", api_version, kind, body["metadata"]["namespace"], name))
        if plan.apply or plan.delete:
            after = self._plan(replace(observed, children=_controlled(record.children, uid)), now, checks, record)
            plan = core.settle(plan, after)
        result = await self._finish(body, plan, key)
        self._after_plan(key, plan)
        if _settled(plan):
            # The memo (rendered children, revision records) is most of what an agent holds, and
            # a settled agent is next reconciled at the resync or on a change: rendering it again
            # then costs a few milliseconds, keeping it costs tens of KiB per agent (bench/operator.py).
            record.memo = core.Memo()
        return result

    async def _undo(
        self, key: AgentKey, body: Mapping[str, Any], record: AgentRecord, token: str
    ) -> tuple[Mapping[str, Any], UndoStatus] | None:
        """Answers undo request ``token`` (undo.py): the agent as it is after the answer, and the
        answer for its status; None when the agent changed under the decision (decided again)."""
        children = _controlled(record.children, body["metadata"]["uid"])

        def find(revision: str) -> Mapping[str, Any] | None:
            return children.get(("apps/v1", "ControllerRevision", controller_revision_name_for(key[1], revision)))

        decision = undo.decide(key[1], token, body.get("spec") or {}, read_status(body.get("status")), find)
        answer = decision.answer
        if decision.spec is not None:
            self._fence()
            operations = undo.spec_patch(body["metadata"]["resourceVersion"], decision)
            try:
                patched = await self.kube.patch_json(AGENT.api_version, AGENT.kind, *key, operations)
            except KubeError as error:
                if error.conflict:
                    self.observe_agent(None, await self.kube.get(AGENT.api_version, AGENT.kind, *key))
                    return None
                if error.status not in (400, 403, 422):
                    raise
                # Refused for good (a stricter CRD since, a webhook, RBAC): said once, in the status.
                message = f"the API server refused the spec of revision {answer.revision}: {error}"
                answer = answer.model_copy(update={"result": UndoResult.REFUSED, "message": message})
            else:
                self.observe_agent(None, patched)
                body = record.body or body  # the agent as patched: the reconcile goes on with it
        refused = answer.result == UndoResult.REFUSED
        reason, type_ = ("UndoRefused", "Warning") if refused else ("Undone", "Normal")
        # Posted with the status that records the answer (_finish): once, even when a reconcile
        # that waits for a measurement decides the same request again before that.
        record.undo_event = (type_, reason, f"undo request {answer.request!r}: {answer.message}")
        return body, answer

    def _plan(
        self, observed: core.Observed, now: datetime, checks: list[rollout.Check] | None, record: AgentRecord
    ) -> core.Plan:
        return core.reconcile(
            observed, now, checks, operator_namespace=self.settings.operator_namespace, memo=record.memo
        )

    def _after_plan(self, key: AgentKey, plan: core.Plan) -> None:
        """Counts what the written status made final, and comes back when a timer runs out."""
        if plan.outcome is not None:
            metrics.ROLLOUTS.labels(result=plan.outcome).inc()
        if plan.promotion_seconds is not None:
            metrics.PROMOTION_DURATION.observe(plan.promotion_seconds)
        if plan.requeue_after is not None:
            # A moment past the deadline, so the next reconcile sees it has passed.
            self.queue.add_after(key, plan.requeue_after + 0.5)

    async def _apply(self, children: KeptAsJson[core.ChildKey], manifest: dict[str, Any]) -> None:
        self._fence()
        try:
            applied = await self.kube.apply(manifest)
        except KubeError as error:
            raise RefusedError(manifest, error) from None
        self._store_child(children, applied)

    async def _foreign_objects(
        self, manifests: list[dict[str, Any]], children: KeptAsJson[core.ChildKey], agent: str, uid: str
    ) -> list[FieldError]:
        """Objects of our children's names that exist and are not this agent's: a Service or
        Secret someone made by hand (labelled like ours or not), another agent's (agents `web` and
        `web-preview` both want a Service `web-preview`), or an earlier agent's of the same name
        that the garbage collector has not removed yet. Server-side apply would take them over, and
        the garbage collector would delete them with the agent; we refuse instead, as a Deployment
        controller does not adopt a ReplicaSet it does not control. Only names the cache does not
        hold are looked up, and only those whose name may be taken (see _known_free): a new agent's
        children of the kinds whose names are watched cost no reads, a name that is taken one."""
        seen: list[Mapping[str, Any]] = []
        unknown: list[dict[str, Any]] = []
        for manifest in manifests:
            name = _name_key(manifest)
            cached = children.get(name[1:])
            if cached is not None:
                seen.append(cached)
            elif not self._known_free(name):
                unknown.append(manifest)
        found = await asyncio.gather(
            *(
                self.kube.find(m["apiVersion"], m["kind"], m["metadata"]["namespace"], m["metadata"]["name"])
                for m in unknown
            )
        )
        return [
            FieldError("metadata.name", _foreign(obj, agent))
            for obj in [*seen, *found]
            if obj is not None and not _controlled_by(obj, uid)
        ]

    async def _ensure_keys(
        self, agent: EnterpriseAgent, body: Mapping[str, Any], record: AgentRecord
    ) -> dict[str, Any]:
        """The key Secret: created once with fresh keys (never overwritten), extended on rotation."""
        secret_key = ("v1", "Secret", key_secret_name(agent))
        uid = body["metadata"]["uid"]
        children = record.children
        secret = children.get(secret_key)
        if secret is not None and not _controlled_by(secret, uid):
            raise ForeignKeysError(_foreign(secret, agent.name))  # labelled like ours is not enough
        if secret is None:
            made_for = (uid, str(agent.spec.security.signing_algorithm))
            if record.unsent_keys is None or record.unsent_keys[0] != made_for:
                record.unsent_keys = made_for, _encode(new_key_files(agent.spec.security.signing_algorithm))
            manifest = core.owned(build_key_secret(agent, record.unsent_keys[1]), agent.name, uid)
            self._fence()
            try:
                secret = await self.kube.create(manifest)
            except KubeError as error:
                if not error.conflict:
                    raise
                # It exists and our cache has not seen it yet: use it, never replace it; but only
                # if it is this agent's (a foreign Secret must not become its keys).
                secret = await self.kube.get("v1", "Secret", agent.namespace, key_secret_name(agent))
                if not _controlled_by(secret, uid):
                    raise ForeignKeysError(_foreign(secret, agent.name)) from None
            record.unsent_keys = None  # created (or found): never sent again
            secret = self._store_child(children, secret)
        requested = (body["metadata"].get("annotations") or {}).get(ANNOTATION_ROTATE_KEYS)
        served = (secret["metadata"].get("annotations") or {}).get(ANNOTATION_ROTATED_FOR)
        if requested and requested != served:
            # From the Secret as it is now, not as the cache last saw it, and written only if it is
            # still that version: a rotation decided on a stale view would drop a key added since.
            current = await self.kube.get("v1", "Secret", agent.namespace, key_secret_name(agent))
            if (current["metadata"].get("annotations") or {}).get(ANNOTATION_ROTATED_FOR) == requested:
                return self._store_child(children, current)
            previous = {name: base64.b64decode(value) for name, value in (current.get("data") or {}).items()}
            files = new_key_files(agent.spec.security.signing_algorithm, previous)
            manifest = core.owned(
                build_key_secret(agent, _encode(files), rotated_for=requested), agent.name, body["metadata"]["uid"]
            )
            manifest["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            self._fence()
            secret = self._store_child(children, await self.kube.apply(manifest))  # 409 if it changed: again
            await self._event(
                body,
                "Normal",
                "KeysRotated",
                f"added new signing, encryption and audit keys for rotation request {requested!r}",
            )
        return secret

    async def _finish(self, body: Mapping[str, Any], plan: core.Plan, key: AgentKey) -> str:
        """Writes the status only when it changed, and posts an Event per transition."""
        if read_status(body.get("status")) != plan.status:
            self._fence()
            written_over = body["metadata"].get("resourceVersion")
            try:
                # Only over the agent this plan was computed from (optimistic concurrency, as
                # controller-runtime's status updates do): a status computed from an older view
                # must not land over a newer one.
                updated = await self.kube.apply_status(key[0], key[1], plan.status_body(), written_over)
            except KubeError as error:
                if not error.conflict:
                    raise
                self.observe_agent(None, await self.kube.get(AGENT.api_version, AGENT.kind, *key))
                return "conflict"  # queued again with the fresh agent
            record = self.records.get(key)
            if record is not None and written_over:
                record.superseded.append(written_over)
            if record is not None and record.body is body:
                # Nothing newer came from the watch while we wrote (a spec edit would have): ours is
                # the freshest view. Otherwise the watch's is, and our write's event follows it.
                record.body = _slim(updated)
                self._touch(("agent", *key))
        record = self.records.get(key)
        if record is not None and record.undo_event is not None:
            pending, record.undo_event = record.undo_event, None
            await self._event(body, *pending)
        for type_, reason, message in plan.events:
            await self._event(body, type_, reason, message)
        phase = plan.status.phase
        if phase is not None:
            metrics.set_phase(key[0], key[1], phase.value)
        if phase == Phase.READY and key in self.records:
            seen = self.records[key].generation_seen_at.pop(plan.status.observed_generation or 0, None)
            if seen is not None:
                metrics.APPLY_TO_READY.observe(time.monotonic() - seen)
        return phase.value.lower() if phase is not None else "unknown"

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self._fence()
        try:
            await self.kube.post_event(body, type_, reason, message, COMPONENT)
        except KubeError as error:  # an Event is best effort: never fail a reconcile over it
            log.warning("could not post event %s on %s: %s", reason, body["metadata"]["name"], error)


# The API server's OwnerReferencesPermissionEnforcement admission maps an ownerReference's kind with
# a discovery cache it refreshes every 30 s: for up to that long after a CRD is installed, a child
# owned by one of its objects is refused 403 "cannot find RESTMapping" (a cluster-admin is not
# asked). Waited out for three refreshes (``discovery_wait_seconds``), then taken for a refusal.
def discovery_lag(error: KubeError) -> bool:
    """A write refused only because the API server's discovery has not caught up with a new CRD."""
    return error.status == 403 and "cannot find RESTMapping" in str(error)


def _settled(plan: core.Plan) -> bool:
    """Ready, with nothing written and nothing to come back for."""
    return (
        plan.status.phase == Phase.READY
        and not plan.apply
        and not plan.delete
        and plan.measure is None
        and plan.requeue_after is None
    )


def _without_managed_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A shallow copy without managedFields, which the reconcile never reads and which is often
    the largest part of an object."""
    return {**obj, "metadata": {k: v for k, v in obj["metadata"].items() if k != "managedFields"}}


def _slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A cached copy without managedFields and with its strings shared (see ``_shared``)."""
    slim = _without_managed_fields(obj)
    try:
        shared: dict[str, Any] = _shared(slim)
    except RecursionError:  # nested deeper than the interning goes (spec.affinity takes any JSON)
        return slim
    return shared


SHARED_STRING_MAX = 64

CacheKey = TypeVar("CacheKey", bound=Hashable)


class KeptAsJson(MutableMapping[CacheKey, dict[str, Any]]):
    """A cache of objects kept as JSON, each decoded afresh when read. At 1,000 agents the
    children's parsed dicts (a ControllerRevision alone 29 KiB, interned) were the operator's
    largest part; their JSON is a third of that, and decoding a child costs microseconds, a few
    times a reconcile. What is read is a copy: a change to it is never kept (nothing here changes
    a cached object in place; a write stores the API server's answer)."""

    __slots__ = ("_json",)

    def __init__(self) -> None:
        self._json: dict[CacheKey, bytes] = {}

    def __getitem__(self, key: CacheKey) -> dict[str, Any]:
        value: dict[str, Any] = orjson.loads(self._json[key])
        return value

    def __setitem__(self, key: CacheKey, value: dict[str, Any]) -> None:
        self._json[key] = json_bytes(value)

    def __delitem__(self, key: CacheKey) -> None:
        del self._json[key]

    def __iter__(self) -> Iterator[CacheKey]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)


def _shared(value: Any) -> Any:
    """A copy whose keys and short strings are interned. A JSON parser makes every key of every
    object a string of its own, and a thousand agents' children repeat the same few hundred keys
    and values: shared, a rendered agent's children take half the memory (46 KiB parsed, 22.5 interned)."""
    if isinstance(value, dict):
        return {(sys.intern(k) if type(k) is str else k): _shared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shared(v) for v in value]
    if type(value) is str and len(value) <= SHARED_STRING_MAX:  # sys.intern takes no str subclass
        return sys.intern(value)
    return value


def _referenced_content(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What the reconcile reads of a referenced object: its data (and its name and version), not
    its annotations, which may repeat the data (kubectl's last-applied-configuration)."""
    metadata = obj.get("metadata") or {}
    kept: dict[str, Any] = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": {k: metadata[k] for k in ("name", "namespace", "resourceVersion") if k in metadata},
    }
    return kept | {section: obj[section] for section in ("data", "binaryData") if section in obj}


def _encode(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(value).decode() for name, value in files.items()}


class RefusedError(Exception):
    """The API server refused one child; names which."""

    def __init__(self, manifest: Mapping[str, Any], error: KubeError) -> None:
        self.manifest = manifest
        self.error = error
        super().__init__(f"{manifest['kind']} {manifest['metadata']['name']}: {error}")

    def field_error(self) -> FieldError:
        return FieldError("spec", str(self))


class MeasurementError(Exception):
    """A rollout analysis ended with an error instead of checks."""


class ForeignKeysError(Exception):
    """The key Secret's name is taken by an object this agent does not control."""


def _cached(record: AgentRecord, obj: Mapping[str, Any]) -> dict[str, Any] | None:
    name = obj["metadata"]["name"]
    if obj["kind"] == ENDPOINT_SLICE.kind:
        return record.endpoint_slices.get(name)
    return record.children.get((obj["apiVersion"], obj["kind"], name))


def _uid(obj: Mapping[str, Any] | None) -> str | None:
    return None if obj is None else (obj.get("metadata") or {}).get("uid")


def _name_key(obj: Mapping[str, Any]) -> NameKey:
    return (obj["metadata"]["namespace"], obj["apiVersion"], obj["kind"], obj["metadata"]["name"])


def _child_identity(obj: Mapping[str, Any]) -> tuple[str, str, str, str, str]:
    meta = obj["metadata"]
    return ("child", obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    return (obj.get("metadata") or {}).get("resourceVersion")


def _older(
    new: Mapping[str, Any], cached: Mapping[str, Any] | None, superseded: deque[str] | tuple[str, ...] = ()
) -> bool:
    """Whether an object from the watch is older than the cached one (same uid). A watch is
    ordered, but the cache is also filled from write responses and reads, which run ahead of it.
    Kubernetes asks clients to treat resourceVersions as opaque; etcd's are integers that only
    grow, so they are compared only when both are integers. The resourceVersions our own writes
    replaced are known either way."""
    version, current = _resource_version(new), _resource_version(cached or {})
    if version is not None and version in superseded:
        return True
    if version is None or current is None or not (version.isdigit() and current.isdigit()):
        return False
    return int(version) < int(current)


def _controlled_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences") or [])


def _controlled(children: Mapping[core.ChildKey, dict[str, Any]], uid: str) -> dict[core.ChildKey, dict[str, Any]]:
    """The cached children this agent controls: a label is anyone's to set, so what the agent reads,
    compares, deletes or takes a revision from is decided by the controller ownerReference."""
    return {key: child for key, child in children.items() if _controlled_by(child, uid)}


def _foreign(obj: Mapping[str, Any], agent: str) -> str:
    name = f"{obj['kind']} {obj['metadata']['name']}"
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("name") == agent:
            return f"{name} belongs to an earlier agent of this name; waiting for the garbage collector to remove it"
    return f"{name} {_foreign_owner(obj)}; {_RENAME}"


def _foreign_owner(obj: Mapping[str, Any]) -> str:
    owners = [
        f"{r.get('kind')} {r.get('name')}" for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")
    ]
    return (
        f"already exists, controlled by {owners[0]}" if owners else "already exists and is not controlled by this agent"
    )

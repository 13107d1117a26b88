"""Every kind of object the operator talks to, in one table.

The table feeds the API module (paths), the watches (which kinds are watched, and by which
label), the informer-style priming list, and the chart's RBAC test (the verbs each kind needs).
A kind added here without its RBAC rule fails that test.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent_operator.spec import GROUP, KIND, PLURAL, VERSION


class Role(StrEnum):
    AGENT = "agent"  # the custom resource itself
    CHILD = "child"  # made, owned and repaired by the operator
    OBSERVED = "observed"  # made by Kubernetes from our children; read only
    SUPPORT = "support"  # Events and the leader Lease


_CHILD_VERBS = frozenset({"get", "list", "watch", "create", "patch", "delete"})


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    role: Role
    verbs: frozenset[str]  # what the operator's ClusterRole (or per-namespace Role) grants
    watched: bool = False  # a watch keeps it in the controller's cache

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def path_prefix(self) -> str:
        return f"/apis/{self.api_version}" if self.group else f"/api/{self.api_version}"


# The agent itself is written only to answer an undo request (the previous revision's fields of
# the spec put back, one JSON patch); otherwise only its status.
AGENT = Kind(f"{GROUP}/{VERSION}", KIND, PLURAL, Role.AGENT, frozenset({"get", "list", "watch", "patch"}), watched=True)
# The status subresource: server-side apply.
AGENT_STATUS_VERBS = frozenset({"patch"})
# Children's ownerReferences set blockOwnerDeletion, which OwnerReferencesPermissionEnforcement
# (on OpenShift by default, and on the local control plane) allows only with this.
AGENT_FINALIZERS_VERBS = frozenset({"update"})

CHILD_KINDS: tuple[Kind, ...] = (
    Kind("apps/v1", "Deployment", "deployments", Role.CHILD, _CHILD_VERBS, watched=True),
    # One per revision of an agent (as StatefulSets keep theirs): what the revision renders to, so
    # a deleted Deployment or ConfigMap comes back as it was and a newer operator changes no pod.
    Kind("apps/v1", "ControllerRevision", "controllerrevisions", Role.CHILD, _CHILD_VERBS, watched=True),
    Kind("v1", "Service", "services", Role.CHILD, _CHILD_VERBS, watched=True),
    # Besides our own (watched by label), the ConfigMaps and Secrets agents reference are read by
    # name (get) and watched metadata only (list, watch): a rotated model key rolls out.
    Kind("v1", "ConfigMap", "configmaps", Role.CHILD, _CHILD_VERBS, watched=True),
    # Key Secrets are created once and extended on rotation, never deleted by the operator.
    Kind("v1", "Secret", "secrets", Role.CHILD, _CHILD_VERBS - {"delete"}, watched=True),
    Kind("v1", "ServiceAccount", "serviceaccounts", Role.CHILD, _CHILD_VERBS, watched=True),
    Kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets", Role.CHILD, _CHILD_VERBS, watched=True),
    Kind(
        "autoscaling/v2", "HorizontalPodAutoscaler", "horizontalpodautoscalers", Role.CHILD, _CHILD_VERBS, watched=True
    ),
    Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies", Role.CHILD, _CHILD_VERBS, watched=True),
    # Made only when spec.observability.serviceMonitor is on and its CRD is installed; not watched,
    # since the CRD may be absent (the chart grants it with rbac.serviceMonitors).
    Kind("monitoring.coreos.com/v1", "ServiceMonitor", "servicemonitors", Role.CHILD, _CHILD_VERBS),
)
# Which pods really are behind the preview and active Services, before and after a promotion.
ENDPOINT_SLICE = Kind(
    "discovery.k8s.io/v1", "EndpointSlice", "endpointslices", Role.OBSERVED, frozenset({"list", "watch"}), watched=True
)
EVENT = Kind("v1", "Event", "events", Role.SUPPORT, frozenset({"create"}))
# Granted by its own Role in the operator's namespace, on the one Lease name.
LEASE = Kind("coordination.k8s.io/v1", "Lease", "leases", Role.SUPPORT, frozenset({"get", "create", "update"}))

ALL_KINDS: tuple[Kind, ...] = (AGENT, *CHILD_KINDS, ENDPOINT_SLICE, EVENT, LEASE)
BY_API_VERSION_KIND: dict[tuple[str, str], Kind] = {(k.api_version, k.kind): k for k in ALL_KINDS}
# Kinds whose objects carry our managed-by label and are watched: children and their EndpointSlices.
WATCHED_BY_LABEL: tuple[Kind, ...] = tuple(k for k in (*CHILD_KINDS, ENDPOINT_SLICE) if k.watched)


def kind_of(api_version: str, kind: str) -> Kind:
    return BY_API_VERSION_KIND[(api_version, kind)]

"""Where things are in an agent pod, and which ports serve what."""

from __future__ import annotations

from pathlib import Path

# Read-only mounts: the runtime ConfigMap, the key Secret, the users Secret.
CONFIG_PATH = "/etc/agent/config.yaml"
CONFIG_FILE_KEY = "config.yaml"  # the ConfigMap key mounted at CONFIG_PATH
KEYS_DIR = "/etc/agent/keys"
USERS_DIR = "/etc/agent/users"
USERS_FILE_KEY = "users"  # the users Secret's key, mounted as USERS_DIR/users
# Writable: the audit trail and the embedded store.
DATA_DIR = "/var/lib/agent"
# Set (from the Secret named in spec.state.postgres.secretRef) when the replicas share state on
# PostgreSQL; without it the runtime keeps its state in the embedded store under DATA_DIR.
DATABASE_URL_ENV = "DATABASE_URL"

# The runtime serves its API, /healthz, /readyz and /metrics on one port; Services expose it on 80.
RUNTIME_PORT = 8080
SERVICE_PORT = 80
# The operator serves /metrics and its liveness check here.
OPERATOR_METRICS_PORT = 8000


def regular_files(directory: str | Path) -> dict[str, bytes]:
    """The regular files of a mounted Secret or ConfigMap volume, by name.

    A real volume also holds ``..data`` (a symlink to a timestamped directory, which the kubelet
    swaps atomically on update), the timestamped directory itself, and one symlink per key into
    ``..data``. Only the per-key entries are data: ``..``-prefixed entries and anything that does
    not resolve to a regular file are skipped.
    """
    files: dict[str, bytes] = {}
    for entry in sorted(Path(directory).iterdir()):
        if entry.name.startswith("..") or not entry.is_file():
            continue
        files[entry.name] = entry.read_bytes()
    return files


# The model's API key, as an env var from the Secret named in spec.model.apiKeySecretRef.
MODEL_API_KEY_ENV = "MODEL_API_KEY"
# The CA bundle of a private model endpoint (spec.model.caBundle, a ConfigMap key), mounted here.
MODEL_CA_DIR = "/etc/agent/model-ca"
MODEL_CA_FILE = "/etc/agent/model-ca/ca.crt"
# The A2A agent card (A2A v0.3's well-known path), served to anyone without a token.
AGENT_CARD_PATH = "/.well-known/agent-card.json"

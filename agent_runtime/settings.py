"""Typed settings: the mounted config file (the operator's ConfigMap) plus the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agent_contract.config import RuntimeConfig
from agent_contract.layout import CONFIG_PATH, DATABASE_URL_ENV, RUNTIME_PORT


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    config: RuntimeConfig
    host: str = "0.0.0.0"  # noqa: S104 - a pod's port must be reachable from the Service
    port: int = RUNTIME_PORT
    shutdown_grace_seconds: float = 25.0  # under the pod's 30 s terminationGracePeriodSeconds
    # The shared state of several replicas (PostgreSQL); None: this replica's own SQLite files.
    # From the environment only (the operator renders it from a Secret), never from the config.
    database_url: str | None = field(default=None, repr=False)  # it holds a password

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data_dir)

    @property
    def audit_file(self) -> Path:
        return Path(self.config.audit.file) if self.config.audit.file else self.data_dir / "audit.log"

    @classmethod
    def load(
        cls, config_path: str | None = None, env: Mapping[str, str] = os.environ, port: int | None = None
    ) -> Settings:
        """Reads the config file (``--config``, else AGENT_CONFIG, else /etc/agent/config.yaml)."""
        path = Path(config_path or env.get("AGENT_CONFIG") or CONFIG_PATH)
        try:
            config = RuntimeConfig.from_yaml(path.read_text())
        except OSError as error:
            raise SettingsError(f"cannot read the config file {path}: {error.strerror}") from None
        except ValueError as error:
            raise SettingsError(f"{path}: {error}") from None
        try:
            chosen_port = port if port is not None else int(env.get("AGENT_PORT", str(RUNTIME_PORT)))
        except ValueError:
            raise SettingsError("AGENT_PORT must be a number") from None
        database_url = env.get(DATABASE_URL_ENV) or None
        if database_url is not None and not database_url.startswith(("postgres://", "postgresql://")):
            raise SettingsError(f"{DATABASE_URL_ENV} must be a postgres:// or postgresql:// URL")
        return cls(
            config=config,
            host=env.get("AGENT_HOST", "0.0.0.0"),  # noqa: S104
            port=chosen_port,
            database_url=database_url,
        )

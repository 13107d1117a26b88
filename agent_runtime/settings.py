"""Typed settings: the mounted config file (the operator's ConfigMap) plus the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent_contract.config import RuntimeConfig
from agent_contract.layout import CONFIG_PATH, RUNTIME_PORT


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    config: RuntimeConfig
    host: str = "0.0.0.0"  # noqa: S104 - a pod's port must be reachable from the Service
    port: int = RUNTIME_PORT
    shutdown_grace_seconds: float = 25.0  # under the pod's 30 s terminationGracePeriodSeconds

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
        return cls(config=config, host=env.get("AGENT_HOST", "0.0.0.0"), port=chosen_port)  # noqa: S104

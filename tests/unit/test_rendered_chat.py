"""examples/full.yaml, rendered by the operator, runs chat for real: the pod's files and environment
are made from the rendered children and the Secrets and ConfigMaps they name, as a kubelet makes
them (volumes at their mount paths, env from secretKeyRef), the runtime is started from them, and
a logged-in caller's chat reaches a fake OpenAI-compatible endpoint over TLS signed by the private
CA from spec.model.caBundle, with the key from spec.model.apiKeySecretRef. Offline: the mount paths
live under a temporary directory, and every path the runtime config names is moved there with them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pytest_aiohttp.plugin import AiohttpClient

from agent_contract.config import RuntimeConfig, SigningAlgorithm
from agent_contract.keyfiles import new_key_files
from agent_contract.layout import MODEL_API_KEY_ENV
from agent_operator.manifest import parse_agent
from agent_operator.render import RenderPlan, build_children
from agent_operator.render.common import key_secret_name
from agent_runtime.app import create_app
from agent_runtime.security.users import hash_line
from agent_runtime.settings import Settings
from tests.fake_model import FakeModel, make_tls
from tests.helpers import example_document

API_KEY = "sk-test-4f1c0ffee"
PASSWORD = "correct horse battery staple"
POD_NAME = "support-bot-blue-7d4b9-x2x7q"

Objects = Mapping[str, Mapping[str, bytes]]  # name -> key -> content, as a volume or env var gets it


def project(directory: Path, data: Mapping[str, bytes], source: Mapping[str, Any]) -> None:
    """A ConfigMap or Secret volume: every key, or only ``items`` under their paths, with defaultMode."""
    items = source.get("items") or [{"key": key, "path": key} for key in data]
    for item in items:
        target = directory / item["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data[item["key"]])
        target.chmod(source.get("defaultMode", 0o644))


def make_pod(root: Path, pod: Mapping[str, Any], secrets: Objects, config_maps: Objects) -> dict[str, str]:
    """The agent container's filesystem under ``root`` and its environment, from the pod spec."""
    (container,) = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        where = root / mount["mountPath"].lstrip("/")
        if "emptyDir" in volume:
            where.mkdir(parents=True, exist_ok=True)
            continue
        source = volume.get("configMap") or volume["secret"]
        data = config_maps[source["name"]] if "configMap" in volume else secrets[source["secretName"]]
        if "subPath" in mount:  # one key as one file
            where.parent.mkdir(parents=True, exist_ok=True)
            where.write_bytes(data[mount["subPath"]])
        else:
            project(where, data, source)
    env: dict[str, str] = {}
    for imported in container.get("envFrom", []):
        ref = imported.get("configMapRef") or imported["secretRef"]
        objects = config_maps if "configMapRef" in imported else secrets
        env.update({imported.get("prefix", "") + k: v.decode() for k, v in objects[ref["name"]].items()})
    fields = {"metadata.name": POD_NAME, "metadata.namespace": "agents"}
    for var in container["env"]:
        source = var.get("valueFrom")
        if source is None:
            env[var["name"]] = var.get("value", "")
        elif "secretKeyRef" in source:
            env[var["name"]] = secrets[source["secretKeyRef"]["name"]][source["secretKeyRef"]["key"]].decode()
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = config_maps[ref["name"]][ref["key"]].decode()
        else:
            env[var["name"]] = fields[source["fieldRef"]["fieldPath"]]
    return env


def moved_under(root: Path, value: Any, mount_paths: list[str]) -> Any:
    """``value`` (the runtime config as data) with every path inside a mount moved under ``root``."""
    if isinstance(value, dict):
        return {key: moved_under(root, item, mount_paths) for key, item in value.items()}
    if isinstance(value, list):
        return [moved_under(root, item, mount_paths) for item in value]
    if isinstance(value, str) and any(PurePosixPath(value).is_relative_to(path) for path in mount_paths):
        moved = root / value.lstrip("/")
        assert moved.exists(), f"the runtime config names {value}, which no rendered volume provides"
        return str(moved)
    return value


async def test_the_full_example_chats_with_its_model_through_what_the_operator_renders(
    tmp_path: Path, aiohttp_client: AiohttpClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    tls = make_tls(tmp_path / "tls")
    async with FakeModel(tls=tls) as fake:
        document = example_document("full")
        document["spec"]["model"]["baseUrl"] = fake.base_url  # https://127.0.0.1:<port>/v1
        # Not here: a PostgreSQL server (each replica's own store instead) and a trace collector.
        del document["spec"]["state"]
        del document["spec"]["observability"]["otlpEndpoint"]
        agent = parse_agent(document)
        children = build_children(agent, RenderPlan.initial(agent, operator_namespace="ops"))
        by_kind = {child["kind"]: child for child in children}
        pod = by_kind["Deployment"]["spec"]["template"]["spec"]

        # What the cluster holds besides the rendered children: the user's Secrets and ConfigMaps, and
        # the key Secret's data (generated by the operator when it reconciles).
        users = "".join(
            hash_line(name, [role], PASSWORD) + "\n" for name, role in [("ada", "admin"), ("ana", "analyst")]
        )
        secrets = {
            "model-credentials": {"api-key": API_KEY.encode()},
            "support-bot-users": {"users": users.encode()},
            key_secret_name(agent): new_key_files(SigningAlgorithm.EDDSA),
        }
        config_maps = {
            by_kind["ConfigMap"]["metadata"]["name"]: {k: v.encode() for k, v in by_kind["ConfigMap"]["data"].items()},
            "internal-ca": {"ca.crt": tls.ca_file.read_bytes()},
            "support-bot-tuning": {"TUNING_PROFILE": b"default"},
        }
        root = tmp_path / "pod"
        env = make_pod(root, pod, secrets, config_maps)
        assert env[MODEL_API_KEY_ENV] == API_KEY

        mounts = [mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]]
        config_file = root / env["AGENT_CONFIG"].lstrip("/")
        rendered = RuntimeConfig.from_yaml(config_file.read_text())
        assert rendered.model is not None
        assert rendered.model.ca_bundle_file is not None
        config = RuntimeConfig.model_validate(moved_under(root, yaml.safe_load(rendered.to_yaml()), mounts))
        moved_file = tmp_path / "config-moved-under-the-pod-root.yaml"
        moved_file.write_text(config.to_yaml())
        for name, value in env.items():  # the runtime reads the key from its environment
            monkeypatch.setenv(name, value)
        client = await aiohttp_client(create_app(Settings.load(str(moved_file), env=env)))

        async def bearer(user: str) -> dict[str, str]:
            login = await client.post("/v1/auth/login", json={"username": user, "password": PASSWORD})
            assert login.status == 200, await login.text()
            return {"Authorization": f"Bearer {(await login.json())['access_token']}"}

        # The example has GDPR: chat handles personal data, so the subject's consent comes first.
        consent = {"subject": "jane@example.com", "purpose": "support"}
        granted = await client.post("/v1/gdpr/consents", json={**consent, "granted": True}, headers=await bearer("ada"))
        assert granted.status == 201, await granted.text()
        request = {"input": {"messages": [{"role": "user", "content": "Where is my parcel?"}]}, **consent}
        answer = await client.post("/v1/operations/chat", json=request, headers=await bearer("ana"))
        assert answer.status == 200, await answer.text()
        assert "Where is my parcel?" in str(await answer.json())

    (received,) = fake.received
    assert received.authorization == f"Bearer {API_KEY}"  # the Secret's key, from the env var alone
    assert received.body["model"] == "meta-llama/Llama-3.1-70B-Instruct"
    assert received.body["messages"][-1]["content"] == "Where is my parcel?"
    assert received.body.get("max_completion_tokens", received.body.get("max_tokens")) == 2048
    # The ConfigMap carries none of it; the NetworkPolicy admits the endpoint's address on its port.
    assert API_KEY not in str(children)
    egress = by_kind["NetworkPolicy"]["spec"]["egress"]
    endpoint = [{"ipBlock": {"cidr": "127.0.0.1/32"}}, {"ipBlock": {"cidr": "10.40.8.0/24"}}]
    assert {"to": endpoint, "ports": [{"protocol": "TCP", "port": fake.port}]} in egress

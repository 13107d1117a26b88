"""The operator run outside the cluster (``make run`` against a managed cluster) with a kubeconfig
whose user is a credential plugin, as EKS, GKE and AKS write them: it logs in through the plugin,
and when the API server refuses the plugin's token it asks the plugin again instead of failing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from eao_devtools.testkit.agents import agent_manifest
from eao_devtools.testkit.kube import Kube
from tests.cluster.agents import apply, wait_phase, wait_until
from tests.faults.conftest import OperatorAccount, start_operator

pytestmark = pytest.mark.cluster

# What a cloud's plugin does, in short: it prints an ExecCredential with a token it got elsewhere
# (here the file beside it), and the operator cannot tell it from one.
PLUGIN = """#!{python}
import json, os, pathlib
here = pathlib.Path(__file__).parent
assert json.loads(os.environ["KUBERNETES_EXEC_INFO"])["spec"]["interactive"] is False
with open(here / "runs", "a") as runs:
    runs.write("run\\n")
token = (here / "token").read_text().strip()
print(json.dumps({{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": {{"token": token}}}}))
"""


def _runs(plugin: Path) -> int:
    runs = plugin / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_an_operator_logged_in_by_a_credential_plugin_asks_it_again_once_its_token_is_refused(
    fault_cluster: Kube, fault_namespace: str, tmp_path: Path, operator_account: OperatorAccount
) -> None:
    kube, ns = fault_cluster, fault_namespace
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    script = plugin / "credential-plugin"
    script.write_text(PLUGIN.format(python=sys.executable))
    script.chmod(0o755)
    (plugin / "token").write_text(operator_account.token())
    # Relative, with a slash: found beside the kubeconfig, wherever the operator was started.
    exec_user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "./plugin/credential-plugin",
                          "interactiveMode": "Never"}}  # fmt: skip
    operator = start_operator(kube, tmp_path, ns, kubeconfig=operator_account.kubeconfig(exec_user))
    try:
        apply(kube, agent_manifest(ns, name="first"))
        wait_phase(kube, ns, "first", "Ready", timeout=90)
        assert _runs(plugin) >= 1
        # Every token the account was issued is refused once it is deleted (its uid goes); made
        # again under the same name, the account has the same rights (bound by name).
        kube.kubectl("delete", "serviceaccount", operator_account.name, "-n", ns)
        kube.kubectl("create", "serviceaccount", operator_account.name, "-n", ns)
        dead = (plugin / "token").read_text().strip()
        server = kube.local.server_url if kube.local else ""

        def refused() -> bool:  # authentication comes before authorisation: 401, not 403
            result = kube.kubectl("--token", dead, "--kubeconfig=/dev/null", f"--server={server}",
                                  "--insecure-skip-tls-verify", "auth", "whoami", check=False)  # fmt: skip
            return "Unauthorized" in result.stderr

        # The API server keeps a verified token for a few seconds: until it sees the account gone.
        wait_until(refused, timeout=60, interval=0.5, what="the operator's token refused")
        asked = _runs(plugin)
        (plugin / "token").write_text(operator_account.token())
        apply(kube, agent_manifest(ns, name="second"))
        wait_phase(kube, ns, "second", "Ready", timeout=120)
        wait_until(lambda: _runs(plugin) > asked, timeout=30, what="the plugin asked again")
    finally:
        operator.stop()
    assert "users[" not in operator.log_path.read_text()  # no kubeconfig error on the way

"""An admission webhook on loopback that refuses: HTTPS with a CA of its own (the API server
verifies it through the configuration's caBundle), answering AdmissionReview v1 requests."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

Refuses = Callable[[dict[str, Any]], bool]


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:  # the serving certificate: for the loopback address the API server dials
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


class RefusingWebhook:
    """Serves ``POST /validate``: refuses the objects ``refuses`` picks with ``message`` (and
    ``code`` as the Status code, when set; the API server makes an unset one 400)."""

    def __init__(self, directory: Path, refuses: Refuses, message: str, code: int | None = None) -> None:
        ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        ca = _certificate("eao-faults-webhook-ca", ca_key, None, ca_key)
        server = _certificate("eao-faults-webhook", server_key, ca, ca_key)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tls.crt").write_bytes(server.public_bytes(serialization.Encoding.PEM))
        (directory / "tls.key").write_bytes(_pem_key(server_key))
        self.ca_bundle = base64.b64encode(ca.public_bytes(serialization.Encoding.PEM)).decode()
        self.refused: list[str] = []  # "OPERATION Kind namespace/name" of each refusal
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "tls.crt", directory / "tls.key")
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                review = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
                request: dict[str, Any] = review["request"]
                allowed = not refuses(request)
                response: dict[str, Any] = {"uid": request["uid"], "allowed": allowed}
                if not allowed:
                    response["status"] = {"message": message, **({"code": code} if code is not None else {})}
                    webhook.refused.append(
                        f"{request['operation']} {request['kind']['kind']} {request['namespace']}/{request['name']}"
                    )
                body = json.dumps(
                    {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}/validate"

    def start(self) -> RefusingWebhook:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def configuration(self, name: str, namespace: str, resource: str, labels: dict[str, str]) -> dict[str, Any]:
        """A ValidatingWebhookConfiguration sending CREATE of ``resource`` (core group) with
        ``labels`` in ``namespace`` here; failing closed, as a policy webhook would."""
        return {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [
                {
                    "name": "refuse.faults.agents.enterprise.io",
                    "clientConfig": {"url": self.url, "caBundle": self.ca_bundle},
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": [resource],
                            "scope": "Namespaced",
                        }
                    ],
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "objectSelector": {"matchLabels": labels},
                    "failurePolicy": "Fail",
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "timeoutSeconds": 5,
                }
            ],
        }

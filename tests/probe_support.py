"""Small registry stand-ins and a moto server for the prober's own tests.

``StandInRegistry`` is a stand-in, not a real registry: a Python HTTPS server
on loopback that answers the manifest HEAD of the Distribution API the way a
scenario needs (a status per repository, Basic credentials, a Bearer challenge
with its token endpoint, or a hung socket), and counts the requests it gets.
It exists because the prober's unit tests need faults a real registry cannot
be made to produce on demand; the black-box scenarios against Debian's
``docker-registry`` live in tests/test_probe_scenarios.py (regfx's fixtures).

``moto_server`` runs the real moto in server mode for the ECR API, reached
through boto3's ``AWS_ENDPOINT_URL_ECR``.  moto's token is
``base64("AWS:123456789012-auth-token")`` with ``expiresAt`` in 2015.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.serving import free_port
from webhook import certs

MOTO_TOKEN = base64.b64encode(b"AWS:123456789012-auth-token").decode()


@dataclass
class StandInRegistry:
    """A loopback HTTPS stand-in registry (see the module docstring)."""

    tmp: Path
    # (repository, reference) -> status; anything else answers ``default``.
    statuses: dict[tuple[str, str], int] = field(default_factory=dict)
    default: int = 404
    basic: str | None = None  # required "Authorization: Basic <this>"
    bearer: bool = False  # challenge with a Bearer realm served here
    hang: bool = False  # accept, never answer
    delay: float = 0.0
    heads: list[str] = field(default_factory=list)
    token_requests: int = 0

    def __post_init__(self) -> None:
        bundle = certs.build_certificate(["localhost"], ["127.0.0.1"])
        self.tmp.mkdir(parents=True, exist_ok=True)
        paths = certs.write_bundle(bundle, self.tmp)
        self.ca_file = str(paths["ca.crt"])
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(paths["tls.crt"]), str(paths["tls.key"]))
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return

            def do_GET(self) -> None:
                if self.path.startswith("/token"):
                    registry.token_requests += 1
                    body = json.dumps({"token": "t0k3n", "expires_in": 300}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self) -> None:
                registry.heads.append(self.path)
                if registry.hang:
                    time.sleep(30)
                    return
                if registry.delay:
                    time.sleep(registry.delay)
                auth = self.headers.get("Authorization", "")
                if registry.basic is not None and auth != f"Basic {registry.basic}":
                    self._answer(401, {"WWW-Authenticate": 'Basic realm="stand-in"'})
                    return
                if registry.bearer and auth != "Bearer t0k3n":
                    port = self.server.server_address[1]
                    challenge = (f'Bearer realm="https://127.0.0.1:{port}/token",'
                                 'service="stand-in",scope="repository:x:pull"')  # fmt: skip
                    self._answer(401, {"WWW-Authenticate": challenge})
                    return
                parts = self.path.split("/manifests/")
                repo = parts[0].removeprefix("/v2/")
                ref = parts[1] if len(parts) > 1 else ""
                accept = self.headers.get("Accept", "")
                if "application/vnd.oci.image.index.v1+json" not in accept:
                    self._answer(404, {})
                    return
                self._answer(registry.statuses.get((repo, ref), registry.default), {})

            def _answer(self, status: int, headers: Mapping[str, str]) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self) -> tuple[socket.socket, Any]:
                sock, addr = self.socket.accept()
                return ctx.wrap_socket(sock, server_side=True), addr

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto in server mode on a free port; yields its URL (for AWS_ENDPOINT_URL_ECR)."""
    port = free_port()
    exe = str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60  # moto's start-up is slow on a loaded machine
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), 0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not start on port {port}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def aws_env(moto_url: str) -> dict[str, str]:
    """Environment for boto3 against moto: fake credentials, the ECR endpoint."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_ENDPOINT_URL_ECR=moto_url, AWS_EC2_METADATA_DISABLED="true")  # fmt: skip
    return env

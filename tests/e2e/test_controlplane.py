"""Smoke tests for the e2e control plane (tests/e2e/controlplane.py)."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client, config

from tests.e2e.controlplane import HERE, Binaries, ControlPlane

pytestmark = pytest.mark.e2e


def api_client(kubeconfig: Path) -> client.ApiClient:
    api = config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
    assert isinstance(api, client.ApiClient)
    return api


def namespace_names(kubeconfig: Path) -> set[str]:
    with api_client(kubeconfig) as api:
        items = client.CoreV1Api(api).list_namespace().items
    return {ns.metadata.name for ns in items if ns.metadata and ns.metadata.name}


def test_namespaces_exist(control_plane: ControlPlane) -> None:
    assert {"default", "kube-system"} <= namespace_names(control_plane.kubeconfig)


def test_configmap_round_trip(control_plane: ControlPlane) -> None:
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    with api_client(control_plane.kubeconfig) as api:
        core = client.CoreV1Api(api)
        core.create_namespaced_config_map(
            "default",
            client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"greeting": "hello"}),
        )
        try:
            got = core.read_namespaced_config_map(name, "default")
            assert got.data == {"greeting": "hello"}
        finally:
            core.delete_namespaced_config_map(name, "default")


def test_server_version(control_plane: ControlPlane) -> None:
    status, body = control_plane.get("/version")
    assert status == 200
    assert b'"gitVersion": "v1.37.2"' in body


def test_kubectl(control_plane: ControlPlane) -> None:
    out = subprocess.run(
        control_plane.kubectl("get", "namespace", "kube-system", "-o", "name"),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "namespace/kube-system"


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """Next stdout line of ``proc``, or '' on EOF/timeout."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def test_cli_ready_and_sigterm(control_plane_binaries: Binaries, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc.yaml"
    # A temp root of its own: other control planes (parallel runs on the same
    # machine) create and remove ecr-webhook-e2e-* in the shared /tmp.
    tmp_root = tmp_path / "tmp"
    tmp_root.mkdir()
    before = set(tmp_root.glob("ecr-webhook-e2e-*"))
    stderr_path = tmp_path / "cli.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "controlplane.py"), "--kubeconfig", str(kubeconfig)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env={**os.environ, "TMPDIR": str(tmp_root)},
        )
        try:
            deadline = time.monotonic() + 180
            lines: list[str] = []
            while time.monotonic() < deadline:
                line = _read_line(proc, deadline - time.monotonic())
                if not line:
                    break
                lines.append(line)
                if line == "ready\n":
                    break
            assert lines and lines[-1] == "ready\n", (
                f"no 'ready' line; stdout={lines!r}\nstderr:\n{stderr_path.read_text()}"
            )
            assert "default" in namespace_names(kubeconfig)

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, stderr_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert not kubeconfig.exists(), "kubeconfig should be removed on exit"
    leftovers = set(tmp_root.glob("ecr-webhook-e2e-*")) - before
    assert not leftovers, f"temp state left behind: {leftovers}"

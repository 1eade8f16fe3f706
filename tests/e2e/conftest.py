"""Fixtures for end-to-end tests against a real kube-apiserver + etcd.

Mark e2e test modules with ``pytestmark = pytest.mark.e2e``. If the control-plane
binaries cannot be built, the fixtures FAIL with the build output: an e2e suite
that silently skips would hide the problem.

The (possibly ~20 minute) first build runs once after collection when any e2e
test was selected, outside any per-test timeout, with its output shown live.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.controlplane import Binaries, BuildError, ControlPlane, build_binaries

_BUILD = pytest.StashKey[Binaries | BuildError]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end test against a real kube-apiserver + etcd (slow)"
    )


def _build(config: pytest.Config) -> Binaries | BuildError:
    if _BUILD not in config.stash:
        capture = config.pluginmanager.getplugin("capturemanager")
        # Show the build's progress live instead of capturing it.
        live = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
        with live:
            try:
                config.stash[_BUILD] = build_binaries(echo=sys.stderr)
            except BuildError as e:
                config.stash[_BUILD] = e
    return config.stash[_BUILD]


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.config.option.collectonly and any(
        item.get_closest_marker("e2e") for item in session.items
    ):
        _build(session.config)


@pytest.fixture(scope="session")
def control_plane_binaries(pytestconfig: pytest.Config) -> Binaries:
    """kube-apiserver, etcd and kubectl (built on first use; see README.md)."""
    result = _build(pytestconfig)
    if isinstance(result, BuildError):
        pytest.fail(f"cannot build the control plane: {result}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def control_plane(
    control_plane_binaries: Binaries, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlane]:
    """A running control plane shared by the whole session.

    Logs are kept under pytest's basetemp (``controlplane-logs*``) for debugging.
    """
    log_dir = tmp_path_factory.mktemp("controlplane-logs")
    with ControlPlane(binaries=control_plane_binaries, log_dir=log_dir) as cp:
        yield cp

"""webhook.background.Periodic: the flusher thread of the metrics and of deferred audit records."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from tests.serving import wait_until
from webhook import background
from webhook.background import Periodic


@pytest.fixture(autouse=True)
def no_exit_calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What Periodic registers at exit, kept here instead of run at the test process's exit."""
    registered: list[Any] = []
    monkeypatch.setattr(background.atexit, "register", registered.append)
    return registered


def test_the_task_runs_again_and_again_in_one_thread_started_once(
    no_exit_calls: list[Any],
) -> None:
    calls: list[str] = []
    periodic = Periodic("test-periodic", 0.01,
                        lambda: calls.append(threading.current_thread().name))
    assert periodic.ensure() and periodic.ensure()
    wait_until(lambda: len(calls) >= 3, 5, "three calls")
    assert set(calls) == {"test-periodic"}
    assert [t.name for t in threading.enumerate()].count("test-periodic") == 1
    assert no_exit_calls == [periodic.task]  # at_exit defaults to the task


def test_a_failing_task_does_not_stop_the_thread() -> None:
    calls: list[int] = []

    def task() -> None:
        calls.append(1)
        raise OSError("disk full")

    Periodic("test-failing", 0.01, task).ensure()
    wait_until(lambda: len(calls) >= 3, 5, "calls after failures")


def test_no_thread_to_be_had_is_not_an_error_and_is_tried_again(
    monkeypatch: pytest.MonkeyPatch, no_exit_calls: list[Any]
) -> None:
    """What the admission path relies on: ensure() never raises."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    periodic = Periodic("test-refused", 0.01, lambda: None, at_exit=lambda: None)
    with monkeypatch.context() as m:
        m.setattr(threading.Thread, "start", refuse)
        assert periodic.ensure() is False
    assert no_exit_calls == []  # nothing to write at exit for a thread that never ran
    assert periodic.ensure() is True
    assert no_exit_calls == [periodic.at_exit]

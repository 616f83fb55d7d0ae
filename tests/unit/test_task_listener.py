"""``medvlm tasks --listen`` without servers (flows/task_listener.py): the listener answers only
the run's bearer token, notifications during a pass give one more pass, a refused Subscription
leaves polling, and the Subscription is deleted at stop. The real FHIR server's notifications:
tests/integration/test_fhir_task_subscription.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest
from fhir.resources.R4B.subscription import Subscription

from connectors.ehr import TaskSubscriptions
from flows.task_listener import CRITERIA, NotificationListener, TaskListener
from medvlm.errors import EhrInvalidResourceError, EhrUnavailableError
from medvlm.settings import TaskSettings

pytestmark = pytest.mark.unit


def _until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class _Ehr:
    """Subscriptions as a server that activates (or refuses) them."""

    def __init__(self, *, status: str = "active", refuse: bool = False) -> None:
        self.status, self.refuse = status, refuse
        self.created: list[Subscription] = []
        self.deleted: list[str] = []
        self.held: dict[str, str] = {}  # the server's Subscriptions: id → status

    def create_subscription(self, subscription: Subscription) -> Subscription:
        if self.refuse:
            raise EhrInvalidResourceError("Subscription (create): HTTP 400 (rejected)")
        self.created.append(subscription)
        sid = f"sub-{len(self.created)}"
        self.held[sid] = self.status
        return subscription.model_copy(update={"id": sid, "status": self.status})

    def subscription_status(self, subscription_id: str) -> str | None:
        return self.held.get(subscription_id)

    def delete_subscription(self, subscription_id: str) -> None:
        self.deleted.append(subscription_id)
        self.held.pop(subscription_id, None)


@contextmanager
def _running(listener: TaskListener[int]) -> Iterator[threading.Event]:
    stop = threading.Event()
    thread = threading.Thread(target=listener.run, args=(stop,))
    thread.start()
    try:
        assert listener.ready.wait(10)
        yield stop
    finally:
        stop.set()
        thread.join(10)
        assert not thread.is_alive()


def test_the_fake_ehr_is_a_task_subscriptions() -> None:
    assert isinstance(_Ehr(), TaskSubscriptions)


def test_a_notification_needs_the_runs_bearer_token() -> None:
    woken: list[int] = []
    listener = NotificationListener("127.0.0.1", 0, "s3cret", lambda: woken.append(1))
    listener.start()
    try:
        with httpx.Client(timeout=10, trust_env=False) as client:
            assert client.post(listener.url).status_code == 401
            wrong = {"Authorization": "Bearer other"}
            assert client.post(listener.url, headers=wrong).status_code == 401
            right = {"Authorization": "Bearer s3cret"}
            assert client.post(listener.url, headers=right).status_code == 200
            # put-resource servers: PUT [endpoint]/Task/[id] with the Task as body
            task = b'{"resourceType": "Task", "id": "t1", "status": "requested"}'
            put = client.put(f"{listener.url}Task/t1", headers=right, content=task)
            assert put.status_code == 200
            assert client.get(listener.url, headers=right).status_code == 405
    finally:
        listener.close()
    assert woken == [1, 1]
    assert (listener.notifications, listener.refused) == (2, 2)


def test_notifications_during_a_pass_give_one_more_pass_and_stop_deletes_the_subscription() -> None:
    ehr = _Ehr()
    in_pass, release = threading.Event(), threading.Event()
    passes: list[int] = []

    def run_pass() -> int:
        passes.append(len(passes))
        if len(passes) == 2:  # the first pass a notification asked for: held open
            in_pass.set()
            assert release.wait(10)
        return len(passes)

    listener: TaskListener[int] = TaskListener(run_pass, TaskSettings(interval_s=300), ehr)
    with _running(listener):
        (sent,) = ehr.created
        assert sent.criteria == CRITERIA and sent.channel.type == "rest-hook"
        assert sent.channel.endpoint == listener.listener.url
        assert sent.channel.payload is None  # an empty notification: no Task, no patient
        assert sent.channel.header == [f"Authorization: Bearer {listener.token}"]
        assert listener.subscription_id == "sub-1"
        _until(lambda: len(passes) == 1)  # the pass at start
        auth = {"Authorization": f"Bearer {listener.token}"}
        with httpx.Client(timeout=10, trust_env=False) as client:
            assert client.post(listener.listener.url, headers=auth).status_code == 200
            assert in_pass.wait(10)
            for _ in range(5):  # a burst while the pass runs
                assert client.post(listener.listener.url, headers=auth).status_code == 200
        release.set()
        _until(lambda: len(passes) == 3)
        time.sleep(0.5)
        assert len(passes) == 3  # the burst of five: one pass
    assert ehr.deleted == ["sub-1"]
    assert listener.listener.notifications == 6


def test_the_endpoint_url_setting_is_what_the_ehr_is_given() -> None:
    ehr = _Ehr()
    settings = TaskSettings(interval_s=300, endpoint_url="https://proxy.example.org/medvlm/hook")
    listener: TaskListener[int] = TaskListener(lambda: 0, settings, ehr)
    with _running(listener):
        assert ehr.created[0].channel.endpoint == "https://proxy.example.org/medvlm/hook"


@pytest.mark.parametrize("ehr", [_Ehr(refuse=True), _Ehr(status="error"), None])
def test_a_refused_subscription_leaves_one_line_and_polling(ehr: _Ehr | None) -> None:
    lines: list[str] = []
    passes: list[int] = []

    def run_pass() -> int:
        passes.append(1)
        return len(passes)

    listener: TaskListener[int] = TaskListener(
        run_pass, TaskSettings(interval_s=1), ehr, say=lines.append
    )
    with _running(listener):
        _until(lambda: len(passes) >= 2)  # at start, then after the interval
    assert listener.subscription_id is None
    assert len(lines) == (2 if ehr is not None and ehr.status == "error" else 1), lines
    assert "polling every 1.0 s" in lines[0]
    if ehr is not None and ehr.status == "error":
        assert ehr.deleted == ["sub-1"]  # not left on the server


def test_a_subscription_the_server_turned_error_is_replaced_after_an_interval() -> None:
    ehr = _Ehr()
    lines: list[str] = []
    listener: TaskListener[int] = TaskListener(
        lambda: 0, TaskSettings(interval_s=1), ehr, say=lines.append
    )
    with _running(listener):
        assert listener.subscription_id == "sub-1"
        ehr.held["sub-1"] = "error"  # deliveries failed: the server stopped notifying
        _until(lambda: listener.subscription_id == "sub-2")
        assert ehr.deleted == ["sub-1"]
        assert "Subscription/sub-1 is error: subscribing again" in lines
    assert ehr.deleted == ["sub-1", "sub-2"]


def test_a_failed_pass_is_one_line_and_the_next_pass_comes() -> None:
    lines: list[str] = []
    passes: list[int] = []

    def run_pass() -> int:
        passes.append(1)
        if len(passes) == 1:
            raise EhrUnavailableError("Task requested: HTTP 503 (unavailable)")
        return len(passes)

    listener: TaskListener[int] = TaskListener(
        run_pass, TaskSettings(interval_s=1), _Ehr(), say=lines.append
    )
    with _running(listener):
        _until(lambda: len(passes) >= 2)
    assert any(line.startswith("pass failed: Task requested: HTTP 503") for line in lines)

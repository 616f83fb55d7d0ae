"""``medvlm tasks --listen``: a pass over the requested Tasks whenever the EHR says one changed.

    start an HTTP listener (``tasks.listen_host``/``listen_port``)
      → create an R4 rest-hook Subscription on the EHR: criteria the requested
        ``draft-imaging-report`` Tasks, endpoint ``tasks.endpoint_url`` (else the listener's own
        address), channel.header ``Authorization: Bearer <a token drawn for this run>``, no
        payload (the notification carries no Task: nothing of a patient travels to the listener)
      → a pass (``flows.tasks.draft_requested_tasks``) at once, then after every notification and
        every ``tasks.interval_s`` without one
      → on stop: the Subscription deleted, the listener closed.

The watermark search stays the source of truth: a notification only says "look now". Several
arriving during a pass give one more pass after it (coalesced), and a lost one costs at most
``interval_s`` of latency. A request to the listener without the run's token is answered 401
and wakes nothing. An EHR that refuses the Subscription (a 4xx: not supported, or created with
``status`` ``error``) leaves one line and the listener polling every ``interval_s``; one the
server turned ``error`` or ``off`` later (notifications that failed) or deleted is replaced when
an interval passes without a notification.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Generic, TypeVar

from fhir.resources.R4B.subscription import Subscription

from connectors.ehr import TaskSubscriptions
from medvlm.errors import ConfigurationError, MedvlmError, one_line
from medvlm.settings import TaskSettings
from pipeline.tasks import DRAFT_IMAGING_REPORT, TASK_CODE_SYSTEM

log = logging.getLogger("medvlm.flows.task_listener")

#: The Tasks a Subscription asks the EHR to notify about.
CRITERIA = f"Task?code={TASK_CODE_SYSTEM}|{DRAFT_IMAGING_REPORT}&status=requested"

#: A notification body larger than this is refused (413): the listener expects none, or one Task.
MAX_BODY = 1 << 20

#: How often the loop looks at its stop event while it waits.
_TICK_S = 0.2

T = TypeVar("T")


class NotificationListener:
    """An HTTP endpoint for rest-hook notifications (POST, or PUT ``[endpoint]/Task/[id]`` as
    some servers send them): one with ``Authorization: Bearer <token>`` is answered 200 and
    calls ``on_notify``; any other request 401 (or 405, 413), calling nothing. The body is read
    and dropped."""

    def __init__(self, host: str, port: int, token: str, on_notify: Callable[[], None]) -> None:
        expected = f"Bearer {token}".encode()
        listener = self
        self.notifications = 0
        self.refused = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            server_version = "medvlm-task-listener"
            sys_version = ""

            def _answer(self, status: HTTPStatus, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _notified(self) -> None:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY:
                    listener._count(refused=True)
                    self.close_connection = True
                    self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                    return
                self.rfile.read(length)
                given = (self.headers.get("Authorization") or "").encode()
                if not hmac.compare_digest(given, expected):
                    listener._count(refused=True)
                    self._answer(HTTPStatus.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
                    return
                listener._count(refused=False)
                self._answer(HTTPStatus.OK)
                on_notify()

            do_POST = _notified
            do_PUT = _notified

            def do_GET(self) -> None:
                self._answer(HTTPStatus.METHOD_NOT_ALLOWED, {"Allow": "POST, PUT"})

            def log_message(self, format: str, *args: object) -> None:
                log.debug("listener: " + format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    def _count(self, *, refused: bool) -> None:
        with self._lock:
            if refused:
                self.refused += 1
            else:
                self.notifications += 1

    @property
    def url(self) -> str:
        """``http://host:port/`` of the bound socket."""
        address, port = self._server.server_address[:2]
        host = address.decode() if isinstance(address, bytes) else str(address)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="task-listener", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()


def subscription_for(endpoint: str, token: str) -> Subscription:
    """The R4 rest-hook Subscription of one listening run (no payload: an empty notification)."""
    return Subscription.model_validate(
        {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "medvlm-pipeline: draft what requested draft-imaging-report Tasks ask for",
            "criteria": CRITERIA,
            "channel": {
                "type": "rest-hook",
                "endpoint": endpoint,
                "header": [f"Authorization: Bearer {token}"],
            },
        }
    )


class TaskListener(Generic[T]):
    """Runs ``run_pass`` at start, after each (coalesced) notification and every
    ``settings.interval_s`` without one, until ``stop`` is set (``run``)."""

    def __init__(
        self,
        run_pass: Callable[[], T],
        settings: TaskSettings,
        subscriptions: TaskSubscriptions | None,
        *,
        on_pass: Callable[[T], None] | None = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.run_pass = run_pass
        self.settings = settings
        self.subscriptions = subscriptions
        self.on_pass = on_pass
        self.say = say or log.info
        self.token = secrets.token_urlsafe(32)
        self.wake = threading.Event()
        self.listener = NotificationListener(
            settings.listen_host, settings.listen_port, self.token, self.wake.set
        )
        self.subscription_id: str | None = None
        self.passes = 0
        self.ready = threading.Event()  # subscribed (or refused) and listening

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint_url or self.listener.url

    def _subscribe(self) -> None:
        if self.subscriptions is None:
            self.say(f"the EHR takes no Subscriptions: polling every {self.settings.interval_s} s")
            return
        try:
            created = self.subscriptions.create_subscription(
                subscription_for(self.endpoint, self.token)
            )
        except ConfigurationError:
            raise
        except MedvlmError as exc:
            self.say(
                f"no Subscription ({one_line(str(exc), limit=200)}): "
                f"polling every {self.settings.interval_s} s"
            )
            return
        self.subscription_id = created.id
        if created.status == "error":
            self.say(
                f"Subscription/{created.id} refused by the EHR "
                f"({one_line(created.error or 'no reason given', limit=200)}): "
                f"polling every {self.settings.interval_s} s"
            )
            self._unsubscribe()
            return
        self.say(
            f"Subscription/{created.id} {created.status}: notifications to {self.endpoint}, "
            f"a pass at least every {self.settings.interval_s} s"
        )

    def _renew_if_lost(self) -> None:
        """A Subscription the server no longer notifies through (turned ``error`` or ``off``
        after deliveries failed, or deleted) is replaced by a new one (asked when a pass is due
        to the interval, not to a notification)."""
        sid = self.subscription_id
        if sid is None or self.subscriptions is None:
            return
        try:
            status = self.subscriptions.subscription_status(sid)
        except MedvlmError as exc:
            self.say(f"Subscription/{sid} not read: {one_line(str(exc), limit=200)}")
            return
        if status in ("active", "requested"):
            return
        self.say(f"Subscription/{sid} is {status or 'gone'}: subscribing again")
        self._unsubscribe()
        self._subscribe()

    def _unsubscribe(self) -> None:
        sid, self.subscription_id = self.subscription_id, None
        if sid is None or self.subscriptions is None:
            return
        try:
            self.subscriptions.delete_subscription(sid)
        except MedvlmError as exc:
            self.say(f"Subscription/{sid} not deleted: {one_line(str(exc), limit=200)}")
            return
        self.say(f"Subscription/{sid} deleted")

    def _pass(self) -> None:
        try:
            result = self.run_pass()
        except ConfigurationError:
            raise
        except MedvlmError as exc:  # an EHR or PACS down: the next notification or interval
            self.say(f"pass failed: {one_line(str(exc), limit=300)}")
            return
        finally:
            self.passes += 1
        if self.on_pass is not None:
            self.on_pass(result)

    def run(self, stop: threading.Event) -> None:
        """Listen, subscribe, pass; until ``stop``. The Subscription is deleted on the way out
        (whatever ended the loop)."""
        self.listener.start()
        try:
            self._subscribe()
            self.ready.set()
            self._pass()
            due = time.monotonic() + self.settings.interval_s
            while not stop.is_set():
                if self.wake.wait(_TICK_S):
                    self.wake.clear()  # a notification during the pass: one more pass after it
                elif time.monotonic() < due:
                    continue
                else:  # no notification for an interval: is the Subscription still there?
                    self._renew_if_lost()
                if stop.is_set():
                    break
                self._pass()
                due = time.monotonic() + self.settings.interval_s
        finally:
            try:
                self._unsubscribe()
            finally:
                self.listener.close()

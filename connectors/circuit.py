"""A circuit breaker per outside service (the EHR, the PACS): stop hammering one that is down.

A call that has spent its whole retry budget on a service that does not answer (connection
refused or reset, timeouts, 502/503/504) opens the breaker: the service is known to be down.
While it is open every call to it fails at once with ``ServiceDownError`` — no request is sent
— and the flow does not count that against the study (``flows.draft_reports``): the study
waits for the service (``probe_once``, every ``probe_interval_s``, from the flow's event loop)
and goes on where it stopped, or the run ends with it still pending. Opening and closing are
logged once each, naming the service and its URL (never a patient identifier), not once per
study.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from medvlm.errors import ServiceDownError

log = logging.getLogger(__name__)

__all__ = ["CircuitBreaker", "public_url"]


def public_url(url: str) -> str:
    """``url`` without user, password, query and fragment (a token may sit in any of them):
    fit for a log line or a message."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    where = f"{host}:{port}" if port is not None else host
    return f"{parts.scheme}://{where}{parts.path}" if parts.scheme else where + parts.path


class CircuitBreaker:
    """Open after a call's retries ran out on an unavailable service; closed again by a
    successful probe (or any successful call). Thread-safe; one per connector."""

    def __init__(
        self,
        service: str,
        url: str,
        probe: Callable[[], None],
        *,
        probe_interval_s: float = 5.0,
        error: type[ServiceDownError] = ServiceDownError,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.url = public_url(url)
        self._probe = probe
        self._probe_interval_s = probe_interval_s
        self._error = error
        self._clock = clock
        self._lock = threading.Lock()
        self._probing = threading.Lock()
        self._opened_at: float | None = None
        self._cause = ""

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.service} {self.url}, open={self.is_open})"

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def down(self, what: str = "") -> ServiceDownError:
        """The error a call (``what``: the request, without patient data) gets while open."""
        prefix = f"{what}: " if what else ""
        return self._error(f"{prefix}{self.service} {self.url} is down ({self._cause})", self)

    def check(self, what: str = "") -> None:
        """Before a call: fail at once while the service is known to be down."""
        if self._opened_at is not None:
            raise self.down(what)

    def succeeded(self) -> None:
        """A call got an answer: the service is up."""
        if self._opened_at is None:
            return
        with self._lock:
            if self._opened_at is None:
                return
            down_s = self._clock() - self._opened_at
            self._opened_at = None
        log.warning("%s %s answers again (down for %.0f s)", self.service, self.url, down_s)

    def failed(self, cause: str, what: str = "") -> ServiceDownError:
        """A call (``what``) spent its retry budget without an answer: open (logged once) and
        return the error to raise instead of the call's own."""
        with self._lock:
            if self._opened_at is None:
                self._opened_at = self._clock()
                self._cause = cause
                log.error(
                    "%s %s is down (%s): new work waits for it, one probe every %.0f s",
                    self.service,
                    self.url,
                    cause,
                    self._probe_interval_s,
                )
        return self.down(what)

    @property
    def probe_interval_s(self) -> float:
        return self._probe_interval_s

    def probe_once(self) -> bool:
        """One probe if none is under way (the breaker closes when it is answered); whether
        the service is up now."""
        if self._opened_at is None:
            return True
        if not self._probing.acquire(blocking=False):
            return False  # another caller is probing: its answer will close the breaker
        try:
            self._probe()
        except Exception as exc:  # any failure of the probe: still down
            log.debug("%s probe: still down (%s)", self.service, type(exc).__name__)
            return False
        finally:
            self._probing.release()
        self.succeeded()
        return True

"""The one retry policy and TLS/timeout set-up of every network edge (PACS, EHR, model service).

Built from ``HttpEdgeSettings``; used by connectors/dicomweb.py, connectors/dimse.py,
connectors/fhir.py and serving/clients.py, each of which keeps only what is its own: which
failures are worth another attempt, and how library exceptions become ``medvlm.errors``.
Backoff is exponential with jitter (tenacity), starting at ``retry_initial_backoff_s`` and never
longer than ``retry_max_backoff_s``; a server's ``Retry-After`` replaces it, up to
``retry_after_max_s`` (``retry_after_wait``).
"""

from __future__ import annotations

import email.utils
import ssl
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)
from tenacity.wait import wait_base

from medvlm.settings import HttpEdgeSettings

__all__ = [
    "backoff",
    "backoff_s",
    "httpx_timeout",
    "retry_after_s",
    "retry_after_wait",
    "retry_policy",
    "tls_verify",
]


def backoff(edge: HttpEdgeSettings) -> wait_base:
    """Exponential backoff with jitter for tenacity."""
    return wait_exponential_jitter(
        initial=edge.retry_initial_backoff_s,
        max=edge.retry_max_backoff_s,
        jitter=edge.retry_initial_backoff_s,
    )


def backoff_s(edge: HttpEdgeSettings, attempt: int) -> float:
    """The (jitter-free) wait after failed attempt number ``attempt`` (1, 2, …), for loops that
    are not exceptions (a DIMSE association that was neither accepted nor rejected)."""
    return float(min(edge.retry_initial_backoff_s * 2 ** (attempt - 1), edge.retry_max_backoff_s))


def retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` value as seconds from ``now``: delta-seconds or an HTTP-date (RFC 9110
    10.2.3; a date already past is 0). None when there is none or it cannot be read."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def retry_after_wait(
    edge: HttpEdgeSettings,
    *,
    retry_after: Callable[[BaseException], str | None],
    refuse: Callable[[RetryCallState, str], BaseException],
    setting: str,
) -> Callable[[RetryCallState], float]:
    """tenacity ``wait``: the server's ``Retry-After`` when it sent one (``retry_after`` reads
    the header off the failed attempt's exception), else ``backoff``.

    A ``Retry-After`` beyond ``edge.retry_after_max_s`` (named ``setting`` in the message) is
    not waited for: ``refuse(state, why)`` is raised at once, so the call fails rather than
    holding a worker for as long as the server asks. It is raised without its cause: a library
    exception's message may name the request URL with its query (a patient identifier).
    """

    def wait(state: RetryCallState) -> float:
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None else None
        after = retry_after_s(retry_after(exc)) if exc is not None else None
        if after is None:
            return float(backoff(edge)(state))
        if after > edge.retry_after_max_s:
            why = (
                f"the server asked to retry after {after:.0f} s, over the "
                f"{edge.retry_after_max_s:g} s cap ({setting}); not retried"
            )
            raise refuse(state, why) from None
        return after

    return wait


def retry_policy(
    edge: HttpEdgeSettings,
    *,
    retry_on: Callable[[BaseException], bool],
    wait: wait_base | Callable[[Any], float] | None = None,
    before_sleep: Callable[[Any], None] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``tenacity.Retrying`` / ``AsyncRetrying``: up to ``retry_attempts``
    attempts within ``retry_budget_s`` seconds while ``retry_on`` says the failure is transient,
    then the last one is raised."""
    policy: dict[str, Any] = {
        "retry": retry_if_exception(retry_on),
        "stop": stop_after_attempt(edge.retry_attempts) | stop_before_delay(edge.retry_budget_s),
        "wait": wait if wait is not None else backoff(edge),
        "reraise": True,
    }
    if before_sleep is not None:
        policy["before_sleep"] = before_sleep
    return policy


def tls_verify(edge: HttpEdgeSettings) -> ssl.SSLContext | bool:
    """httpx ``verify``: off, the hospital's CA bundle, or the system CAs."""
    if not edge.verify_tls:
        return False
    if edge.ca_bundle is not None:
        return ssl.create_default_context(cafile=str(edge.ca_bundle))
    return True


def httpx_timeout(edge: HttpEdgeSettings) -> httpx.Timeout:
    """Finite connect, read, write and pool timeouts."""
    return httpx.Timeout(
        connect=edge.connect_timeout_s,
        read=edge.read_timeout_s,
        write=edge.write_timeout_s,
        pool=edge.pool_timeout_s,
    )

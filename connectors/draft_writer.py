"""Writing a draft into any EHR without duplicates, whatever the server offers.

Three ways to send a draft's resources (``pipeline.fhir_resources.DraftResources``), chosen from
the server's CapabilityStatement at start-up unless a setting names one (``job.write_strategy``):

- ``transaction``: one transaction Bundle of conditional creates (``ifNoneExist``), when the
  server lists the ``transaction`` interaction and conditional create for every type written;
- ``conditional``: one ``POST`` per resource with ``If-None-Exist``, when it offers conditional
  create but no transactions (US Core makes transactions optional);
- ``search``: one plain ``POST`` per resource after a search for its key, for servers with
  neither (Epic's notes API, Oracle Health).

None of them trusts the server to be idempotent. A write whose answer is lost (a timeout, a
5xx, a reset: the server may have committed it) is never simply sent again: the writer first
searches every resource's key (``PendingResource.key``) and sends only what is missing, with
references to what exists. The caller records ``writing`` in its ledger before the first request
and passes ``resume=True`` when it finds a job in that state, so a crash between the server's
commit and the ledger's is covered the same way. The model's Device is written once per model
version (search, then create, under a lock; its reference is cached) and never inside a draft's
request, so concurrent first drafts cannot make several Devices, and a server that already holds
several (from an older release, or another worker's race) is answered with the oldest, never
with a failed study.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from enum import StrEnum
from typing import Any, TypeVar

from fhir.resources.R4B.resource import Resource

from connectors.ehr import Ehr, WriteCapabilities
from medvlm.errors import EhrError, EhrUnavailableError, ServiceDownError
from pipeline.ehr_rules import created_ids
from pipeline.fhir_resources import DraftResources, PendingResource, SearchKey, as_transaction

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["DraftWriter", "WriteStrategy", "choose_strategy"]


class WriteStrategy(StrEnum):
    AUTO = "auto"
    TRANSACTION = "transaction"
    CONDITIONAL = "conditional"
    SEARCH = "search"


def choose_strategy(
    setting: str, capabilities: WriteCapabilities, types: Collection[str]
) -> WriteStrategy:
    """The strategy a setting names, or (``auto``) the strongest the server says it offers for
    ``types``."""
    chosen = WriteStrategy(setting)
    if chosen is not WriteStrategy.AUTO:
        return chosen
    conditional = all(t in capabilities.conditional_create for t in types)
    if conditional and capabilities.transaction:
        return WriteStrategy.TRANSACTION
    return WriteStrategy.CONDITIONAL if conditional else WriteStrategy.SEARCH


def _oldest(found: Sequence[Resource]) -> Resource:
    """Of several matches of one key, the first written (then the smallest id): every worker
    picks the same one."""

    def order(resource: Resource) -> tuple[str, str]:
        meta = resource.meta
        updated = str(meta.lastUpdated) if meta is not None and meta.lastUpdated else ""
        return updated, str(resource.id or "")

    return min(found, key=order)


def _rewrite(data: Any, refs: dict[str, str]) -> Any:
    """``data`` with every ``reference`` to a placeholder replaced by the server's ``Type/id``."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            if key == "reference" and isinstance(value, str) and value in refs:
                out[key] = refs[value]
            else:
                out[key] = _rewrite(value, refs)
        return out
    if isinstance(data, list):
        return [_rewrite(item, refs) for item in data]
    return data


class DraftWriter:
    """Writes drafts to one EHR with one strategy; safe to share between threads."""

    def __init__(
        self,
        ehr: Ehr,
        strategy: WriteStrategy,
        *,
        attempts: int = 4,
        backoff_s: float = 1.0,
        max_backoff_s: float = 20.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if strategy is WriteStrategy.AUTO:
            raise ValueError("DraftWriter needs a chosen strategy (choose_strategy)")
        self.ehr = ehr
        self.strategy = strategy
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._device_lock = threading.Lock()
        self._devices: dict[tuple[str, str], str] = {}

    # -- the model's Device, once per model version -------------------------------------------

    def device(
        self,
        device: dict[str, Any],
        key: SearchKey,
        *,
        lookup: Callable[[], str | None] | None = None,
        remember: Callable[[str], None] | None = None,
    ) -> str:
        """``Device/{id}`` of the model: known to this writer, else ``lookup``'s (the ledger's),
        else found by ``key`` in the EHR, else created; ``remember`` is told a reference that
        ``lookup`` did not know. One caller at a time does this; the others wait for it."""
        known = self._devices.get((key.system, key.value))
        if known is not None:
            return known
        with self._device_lock:
            known = self._devices.get((key.system, key.value))
            if known is not None:
                return known
            saved = lookup() if lookup is not None else None
            if saved:
                self._devices[(key.system, key.value)] = saved
                return saved
            pending = PendingResource("", device, key)
            ref = self._ensure(pending, {})
            # Another worker may have created one at the same moment: all settle on the oldest.
            ref = self._find(pending) or ref
            if remember is not None:
                remember(ref)
            self._devices[(key.system, key.value)] = ref
        return ref

    # -- a draft -------------------------------------------------------------------------------

    def write(self, draft: DraftResources, *, resume: bool = False) -> dict[str, list[str]]:
        """Write the draft's resources; returns resource type → ids (existing or created).

        ``resume``: the ledger says an earlier attempt may have reached the server, so what
        exists is looked up before anything is sent.
        """

        def attempt(number: int) -> dict[str, list[str]]:
            refs = self._existing(draft) if resume or number > 1 else {}
            if len(refs) == len(draft.entries):
                return created_ids(refs.values())
            if self.strategy is WriteStrategy.TRANSACTION and not refs:
                response = self.ehr.transaction(
                    as_transaction(draft), retry=False, about=f"{draft.main_type} {draft.draft_id}"
                )
                return created_ids(
                    entry.response.location for entry in response.entry or [] if entry.response
                )
            for pending in draft.entries:
                if pending.full_url not in refs:
                    refs[pending.full_url] = self._create(pending, refs)
            return created_ids(refs.values())

        return self._attempts_of(draft.draft_id, attempt)

    def _attempts_of(self, name: str, attempt: Callable[[int], T]) -> T:
        """``attempt(1)``, ``attempt(2)``, … while the EHR's answer is lost (timeout, 5xx,
        reset: it may have applied the request), backing off between them; each attempt after
        the first looks up what exists before sending anything."""
        last: EhrError | None = None
        for number in range(1, self._attempts + 1):
            try:
                return attempt(number)
            except ServiceDownError:
                raise  # the EHR is down: the caller waits for it (connectors.circuit)
            except EhrUnavailableError as exc:
                last = exc
                if number < self._attempts:
                    wait = min(self._backoff_s * 2 ** (number - 1), self._max_backoff_s)
                    log.warning(
                        "%s: write not confirmed (%s); looking for what was written before "
                        "trying again in %.1f s",
                        name,
                        exc,
                        wait,
                    )
                    self._sleep(wait)
        assert last is not None
        raise last

    def _existing(self, draft: DraftResources) -> dict[str, str]:
        """Placeholder → ``Type/id`` of the draft's resources the server already holds."""
        refs: dict[str, str] = {}
        main = draft.main
        found = self._find(main)
        if found is None and self.strategy is WriteStrategy.TRANSACTION:
            return refs  # a transaction is all or nothing: no report, nothing of it
        for pending in draft.entries:
            ref = found if pending is main else self._find(pending)
            if ref is not None:
                refs[pending.full_url] = ref
        return refs

    def _find(self, pending: PendingResource) -> str | None:
        key = pending.key
        found = self.ehr.find_by_key(pending.resource_type, key.param, key.system, key.value)
        if not found:
            return None
        if len(found) > 1:
            log.warning(
                "%s %s: %d resources carry this key; using the oldest",
                pending.resource_type,
                key.value,
                len(found),
            )
        return f"{pending.resource_type}/{_oldest(found).id}"

    def _create(self, pending: PendingResource, refs: dict[str, str]) -> str:
        resource = _rewrite(copy.deepcopy(pending.resource), refs)
        if self.strategy is WriteStrategy.SEARCH:
            # The search before a plain create: in this mode the server cannot refuse a twin.
            existing = self._find(pending)
            if existing is not None:
                return existing
            return self.ehr.create(resource)
        return self.ehr.create(resource, if_none_exist=pending.key.query)

    def _ensure(self, pending: PendingResource, refs: dict[str, str]) -> str:
        """Found by its key, else created (with the writer's retries)."""

        def attempt(number: int) -> str:
            return self._find(pending) or self._create(pending, refs)

        return self._attempts_of(f"{pending.resource_type} {pending.key.value}", attempt)

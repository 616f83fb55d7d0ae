"""Orthanc-specific new-study detection through its REST change feed.

Orthanc records every change in ``GET /changes?since=N&limit=100``; a study is complete when a
``StableStudy`` change appears (no new instance for ``StableAge`` seconds). Its ``ID`` is Orthanc's
own identifier, resolved with ``GET /studies/{id}`` to the Study Instance UID. Selected with
``pacs.new_study_detection = "orthanc_changes"``; the generic QIDO detection needs no Orthanc.

A study that becomes stable again (instances added later) is reported again: the caller's ledger
decides whether that is new work.

What this module must not do: log the change payloads or main DICOM tags (they carry patient
data), or be imported by generic DICOMweb code paths that do not select it.
"""

from __future__ import annotations

from typing import Any, Final

import requests

from connectors.dicomweb import HttpEdge
from medvlm.errors import PacsError, PacsNotFoundError

CHANGES_PAGE: Final = 100


class OrthancChangeFeed:
    """Reads ``/changes`` on an Orthanc REST root with an existing (authenticated) session."""

    def __init__(
        self,
        session: requests.Session,
        url: str,
        *,
        timeout: tuple[float, float],
        edge: HttpEdge,
    ) -> None:
        self._session = session
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._edge = edge

    def _get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        def fetch() -> Any:
            r = self._session.get(f"{self._url}{path}", params=params, timeout=self._timeout)
            r.raise_for_status()
            return r.json()

        return self._edge.call(fetch, study_uid=None, what="Orthanc REST")

    def last_seq(self) -> int:
        """The newest change number now (start here to see only future studies)."""
        return int(self._get("/changes", {"last": ""})["Last"])

    def stable_studies_since(self, since: int | None) -> tuple[list[str], int]:
        """Study Instance UIDs that became stable after change ``since`` (None: from the start).

        Follows the feed until ``Done``; returns the UIDs (first-seen order, no duplicates) and
        the last change number to pass next time.
        """
        seq = since or 0
        orthanc_ids: list[str] = []
        while True:
            page = self._get("/changes", {"since": seq, "limit": CHANGES_PAGE})
            for change in page.get("Changes", []):
                if change.get("ChangeType") == "StableStudy" and change["ID"] not in orthanc_ids:
                    orthanc_ids.append(str(change["ID"]))
            seq = int(page.get("Last", seq))
            if page.get("Done", True):
                break
        uids: list[str] = []
        for orthanc_id in orthanc_ids:
            try:
                study = self._get(f"/studies/{orthanc_id}")
            except PacsNotFoundError:
                continue  # deleted after it became stable
            uid = study.get("MainDicomTags", {}).get("StudyInstanceUID")
            if not uid:
                raise PacsError("Orthanc study without StudyInstanceUID in /studies/{id}")
            if uid not in uids:
                uids.append(str(uid))
        return uids, seq

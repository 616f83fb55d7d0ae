"""No patient identifier in a PACS error's traceback.

The HTTP library's own message names the request URL with its query (a QIDO-RS search by
AccessionNumber or PatientID); a chained exception prints it in every traceback — on stderr and
in Prefect's log table when a run fails. The project's errors are raised without the chain.
"""

from __future__ import annotations

import traceback

import pytest
import requests

from connectors.dicomweb import HttpEdge
from medvlm.errors import PacsUnavailableError
from medvlm.settings import HttpEdgeSettings

pytestmark = pytest.mark.unit

URL = "http://pacs.example/dicom-web/studies?AccessionNumber=ACC-5566778&PatientID=MRN-991122"


def test_a_failed_qido_call_shows_neither_the_url_nor_its_identifiers() -> None:
    edge = HttpEdge(HttpEdgeSettings(retry_attempts=2, retry_initial_backoff_s=0.01))

    def search() -> None:
        raise requests.ConnectionError(f"Max retries exceeded with url: {URL}")

    with pytest.raises(PacsUnavailableError) as raised:
        edge.call(search, study_uid=None, what="QIDO-RS")
    printed = "".join(traceback.format_exception(raised.value))
    assert "QIDO-RS" in printed and "ConnectionError" in printed
    for secret in ("ACC-5566778", "MRN-991122", "AccessionNumber="):
        assert secret not in printed

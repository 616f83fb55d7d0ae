"""A deterministic drafter for the fast tier of the main flow's tests.

``ScriptedDrafter`` implements the same ``serving.clients.Drafter`` protocol as the Serve-handle,
HTTP and OpenAI backends and turns its scripted completions into results through the same
``pipeline.report.result_from_completion`` they use. It stands in for the model only where the
point is the flow's state machine (every outcome on demand, in milliseconds); the real engine
runs in the integration and end-to-end tests.

Outcomes, per study reference (``ModelInput.reference``):

- ``valid``: a schema-valid report;
- ``invalid-json``: text that is not JSON (a model that ignored the grammar);
- ``cut``: a report cut at max_tokens (finish reason ``length``);
- ``timeout``: never answers (the flow's ``job.draft_timeout_s`` ends it);
- ``crash``: raises ``KeyError``, as a backend bug would (an exception outside the project's
  error tree);
- ``killed``: raises ``ProcessKilled``, a ``BaseException`` that no error boundary catches: the
  run stops where it is, as if the worker process had been killed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Literal

from pipeline.prompts import ModelInput
from pipeline.report import DraftResult, result_from_completion

Outcome = Literal["valid", "invalid-json", "cut", "timeout", "crash", "killed"]

VALID_REPORT = {
    "rationale": "Scripted test output.",
    "findings": [
        {
            "name": "cardiomegaly",
            "presence": "absent",
            "laterality": "not_applicable",
            "location": "heart",
            "severity": "not_applicable",
            "detail": "Normal cardiac silhouette.",
        }
    ],
    "impression": "No acute abnormality.",
    "critical": False,
    "recommendation": "none",
}


class ProcessKilled(BaseException):
    """The worker process died mid-study (not an error the flow may catch)."""


class ScriptedDrafter:
    """``Drafter`` with a scripted outcome per study; records every call and its input."""

    def __init__(
        self, script: Mapping[str, Outcome] | None = None, default: Outcome = "valid"
    ) -> None:
        self.script = dict(script or {})
        self.default: Outcome = default
        self.calls: list[str] = []
        self.inputs: dict[str, ModelInput] = {}

    async def draft(self, model_input: ModelInput) -> DraftResult:
        reference = model_input.reference
        self.calls.append(reference)
        self.inputs[reference] = model_input
        outcome = self.script.get(reference, self.default)
        text, finish = json.dumps(VALID_REPORT), "stop"
        if outcome == "invalid-json":
            text = "The heart is normal."
        elif outcome == "cut":
            text, finish = text[:40], "length"
        elif outcome == "timeout":
            await asyncio.sleep(3600)
        elif outcome == "crash":
            raise KeyError("choices")
        elif outcome == "killed":
            raise ProcessKilled(reference)
        return result_from_completion(
            text,
            reference=reference,
            finish_reason=finish,
            model="scripted",
            prompt_tokens=1,
            completion_tokens=len(text),
            latency_s=0.001,
            max_tokens=64,
        )

    async def aclose(self) -> None:
        return None

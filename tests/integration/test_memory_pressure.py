"""The model engine starts and drafts while another process holds 40% of the machine's RAM.

Before the KV cache was sized in bytes, vLLM on CPU took a share of the NUMA node's RAM and
failed on machines whose node 0 reported less, or when other programs held memory.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from medvlm.dev.demo import sample_model_input
from medvlm.settings import ModelSettings
from pipeline.prompts import build_messages
from pipeline.report import parse_report, report_json_schema
from serving.engine import GenerationOptions, VllmChatEngine
from tests.memory_pressure import hold_memory, resident_bytes, total_memory_bytes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_engine_drafts_while_another_process_holds_40_percent_of_ram(
    tiny_model_dir: Path,
) -> None:
    model = ModelSettings(max_model_len=4096)
    chest = sample_model_input()
    with hold_memory(0.4) as holder:
        assert resident_bytes(holder.pid) >= 0.39 * total_memory_bytes()
        engine = VllmChatEngine(str(tiny_model_dir), model, on_gpu=False)
        try:
            result = asyncio.run(
                engine.chat(
                    build_messages(chest),
                    GenerationOptions(
                        max_tokens=model.max_tokens, json_schema=report_json_schema()
                    ),
                    request_id="pressure",
                )
            )
        finally:
            engine.shutdown()
            del engine
            gc.collect()
    assert result.finish_reason == "stop"
    parse_report(result.text, reference=chest.reference)  # schema-valid, or this raises

"""Real vLLM (offline API, CPU backend) serves the tiny checkpoints with an image and the schema.

One engine per architecture, created in a module-scoped fixture and shut down before the next.
The weights are random: these tests prove loading, image preprocessing, the vision tower and
guided decoding, not the content of any draft.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from PIL import Image

from medvlm.dev.tiny_model import Architecture, build_tiny_checkpoint
from medvlm.settings import ModelSettings
from pipeline.prompts import png_data_url
from pipeline.report import parse_report, report_json_schema
from serving.kv_cache import cpu_kv_cache

if TYPE_CHECKING:
    from vllm import LLM, SamplingParams

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# The schema bounds every string and list, so a complete report fits well under this; a draft
# that hits it (finish_reason "length") is a failure, not something to retry.
MAX_TOKENS = 3500


@pytest.fixture(scope="module", params=["qwen2_vl", "gemma3"])
def engine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LLM]:
    architecture: Architecture = request.param
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / architecture, architecture)
    with pytest.MonkeyPatch.context() as env:
        # No hub access; vLLM must choose its CPU platform beside a CUDA-built torch. Set before
        # the engine spawns its processes, which inherit the environment.
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TRANSFORMERS_OFFLINE", "1")
        env.setenv("VLLM_TARGET_DEVICE", "cpu")
        from vllm import LLM

        llm = LLM(
            model=str(checkpoint),
            seed=0,
            max_model_len=4096,
            # Sized in bytes as the product does (a fraction depends on the NUMA layout).
            kv_cache_memory_bytes=cpu_kv_cache(
                ModelSettings(max_model_len=4096), str(checkpoint), local_node=True
            ).bytes,
            # Without this a random model fills the grammar's optional JSON whitespace until
            # max_tokens; per-request disable_any_whitespace does not take effect.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            limit_mm_per_prompt=(
                {"image": 1, "video": 0} if architecture == "qwen2_vl" else {"image": 1}
            ),
        )
        try:
            yield llm
        finally:
            client: Any = llm.llm_engine.engine_core  # the multiprocess client
            client.shutdown()
            # The shutdown only signals the client's output thread; destroying the ZMQ context
            # while that thread still closes its socket aborts the process in libzmq (seen in
            # CI: "Fatal Python error: Aborted" in process_outputs_socket). Let it finish first.
            client.output_queue_thread.join(timeout=30)
            # vLLM 0.32's shutdown closes the client's ZMQ sockets but not its context; pyzmq
            # then warns (ResourceWarning, an error here) whenever the context is collected.
            client.ctx.destroy(linger=0)
            del client, llm
            gc.collect()


def chest_radiograph_messages() -> list[Any]:
    radiograph = Image.new("L", (512, 512), color=60)
    radiograph.paste(200, (120, 80, 390, 430))  # a bright "mediastinum" on a dark field
    png = io.BytesIO()
    radiograph.save(png, format="PNG")
    return [
        {"role": "system", "content": "You are a radiology assistant drafting reports."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(png.getvalue())}},
                {"type": "text", "text": "Draft the report of this chest radiograph as JSON."},
            ],
        },
    ]


def report_sampling() -> SamplingParams:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(
        temperature=0,
        seed=0,
        max_tokens=MAX_TOKENS,
        structured_outputs=StructuredOutputsParams(json=report_json_schema()),
    )


def test_engine_drafts_a_schema_valid_report_from_an_image(engine: LLM) -> None:
    [result] = engine.chat([chest_radiograph_messages()], report_sampling(), use_tqdm=False)

    completion = result.outputs[0]
    assert completion.finish_reason == "stop", completion.text[-200:]
    # The product's parser: strict JSON after normalisation (xgrammar's bounded strings admit raw
    # control characters, which the byte tokens of both tiny vocabularies can emit).
    report = parse_report(completion.text, reference="tiny-model-test")
    assert 1 <= len(report.findings) <= 8
    # The image became a few placeholder tokens, not hundreds.
    assert result.prompt_token_ids is not None and len(result.prompt_token_ids) < 200


def test_same_seed_gives_the_same_draft(engine: LLM) -> None:
    messages = chest_radiograph_messages()

    first = engine.chat([messages], report_sampling(), use_tqdm=False)[0].outputs[0]
    second = engine.chat([messages], report_sampling(), use_tqdm=False)[0].outputs[0]

    assert first.finish_reason == "stop", first.text[-200:]
    assert second.text == first.text
    assert list(second.token_ids) == list(first.token_ids)


def test_engine_runs_the_checkpoint_in_its_own_dtype(engine: LLM) -> None:
    import torch

    # The checkpoint is saved in bfloat16, as the released ones; vLLM must not cast it.
    assert engine.llm_engine.model_config.dtype == torch.bfloat16

"""The Triton backend's request (the vLLM backend's tensors), its chat template, its settings and
its errors, without a server (tests/integration/test_triton_backend.py drafts through one)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from pydantic import ValidationError
from tritonclient.utils import InferenceServerException

from medvlm.dev import triton_model
from medvlm.errors import ConfigurationError, EngineUnavailableError
from medvlm.settings import MedvlmSettings, TritonSettings
from pipeline.prompts import ModelInput, StudyContext
from pipeline.report import report_json_schema
from serving.triton_drafter import (
    RETURN_FLAGS,
    ChatTemplate,
    TritonAnswerError,
    TritonDrafter,
    build_request,
    build_triton_drafter,
    retryable,
    triton_address,
)

pytestmark = pytest.mark.unit


def _png(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (48, 40), shade).save(buffer, "PNG")
    return buffer.getvalue()


def _model_input(images: int = 2) -> ModelInput:
    return ModelInput(
        reference="study-0a1b2c",
        images_png=tuple(_png(40 * i) for i in range(images)),
        context=StudyContext(modality="CR", indication="Cough"),
    )


def test_the_prompt_is_rendered_as_the_checkpoints_own_tokenizer_renders_it(
    tiny_model_dir: Path,
) -> None:
    """The Jinja rendering here equals transformers' apply_chat_template for the same chat."""
    from transformers import AutoTokenizer

    template = ChatTemplate.load(tiny_model_dir)
    request = build_request(_model_input(), template, max_tokens=64)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    conversation: list[dict[str, Any]] = [
        {"role": "system", "content": _system_prompt(request.prompt)},
        {
            "role": "user",
            "content": [
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": _user_text(request.prompt)},
            ],
        },
    ]
    expected = tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    )
    assert request.prompt == expected
    assert request.prompt.count("<|image_pad|>") == 2
    assert request.prompt.endswith("<|im_start|>assistant\n")


def _system_prompt(prompt: str) -> str:
    return prompt.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]


def _user_text(prompt: str) -> str:
    user = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
    return user.rsplit("<|vision_end|>", 1)[1]


def test_the_request_has_the_vllm_backends_tensors(tiny_model_dir: Path) -> None:
    model_input = _model_input()
    request = build_request(model_input, ChatTemplate.load(tiny_model_dir), max_tokens=300, seed=7)
    tensors = {name: (datatype, value) for name, datatype, value in request.tensors()}
    assert set(tensors) == {
        "text_input",
        "image",
        "stream",
        "sampling_parameters",
        "exclude_input_in_output",
        *RETURN_FLAGS,
    }
    assert tensors["text_input"][0] == "BYTES" and tensors["text_input"][1].shape == (1,)
    assert tensors["text_input"][1][0].decode() == request.prompt
    assert tensors["stream"][0] == "BOOL" and not tensors["stream"][1][0]
    assert tensors["exclude_input_in_output"][1][0]
    # Images: base64 of each PNG, in order (the backend b64decodes and opens them with PIL).
    datatype, images = tensors["image"]
    assert datatype == "BYTES" and images.shape == (2,)
    assert [base64.b64decode(i) for i in images] == list(model_input.images_png)
    # Sampling: vLLM SamplingParams fields; guided decoding as a JSON string of {"json": schema}.
    sampling = json.loads(tensors["sampling_parameters"][1][0])
    assert sampling["max_tokens"] == 300 and sampling["temperature"] == 0
    assert sampling["seed"] == 7
    assert json.loads(sampling["structured_outputs"]) == {"json": report_json_schema()}


def test_the_dev_servers_model_reads_the_request_the_drafter_sends(tiny_model_dir: Path) -> None:
    """The Triton dev server's model (medvlm/dev/triton_model.py) turns the drafter's tensors
    into the Serve app's /v1/generate body without losing anything."""
    model_input = _model_input(images=1)
    request = build_request(model_input, ChatTemplate.load(tiny_model_dir), max_tokens=99)
    inputs = {name: value for name, _, value in request.tensors()}
    body = triton_model.to_generate_body(inputs)
    assert body["prompt"] == request.prompt
    assert [base64.b64decode(i) for i in body["images_b64"]] == list(model_input.images_png)
    assert body["json_schema"] == report_json_schema()
    assert (body["max_tokens"], body["temperature"], body["seed"]) == (99, 0, 0)
    with pytest.raises(ValueError, match="not served here"):
        triton_model.to_generate_body(
            inputs | {"sampling_parameters": _bytes_array(json.dumps({"top_k": 3}))}
        )


def test_the_dev_servers_model_config_declares_the_vllm_backends_tensors() -> None:
    """config.pbtxt parses as Triton's ModelConfig, declares every tensor the drafter sends and
    reads (with the vLLM backend's types), and hands the model its Serve URL, which
    ``TritonPythonModel.initialize`` reads back from the JSON form Triton passes it."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    text = triton_model.model_config('http://127.0.0.1:9/"x"', instances=3, timeout_s=42)
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.backend == "python" and config.max_batch_size == 0
    assert config.instance_group[0].count == 3
    assert config.model_transaction_policy.decoupled  # as Triton's vLLM backend
    types = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in config.input}
    assert types == {
        "text_input": "TYPE_STRING",
        "image": "TYPE_STRING",
        "stream": "TYPE_BOOL",
        "sampling_parameters": "TYPE_STRING",
        "exclude_input_in_output": "TYPE_BOOL",
        **dict.fromkeys(RETURN_FLAGS, "TYPE_BOOL"),
    }
    assert {t.name for t in config.input if not t.optional} == {"text_input"}
    outputs = {t.name: model_config_pb2.DataType.Name(t.data_type) for t in config.output}
    assert outputs == {
        "text_output": "TYPE_STRING",
        "finish_reason": "TYPE_STRING",
        "num_input_tokens": "TYPE_UINT32",
        "num_output_tokens": "TYPE_UINT32",
    }
    model = triton_model.TritonPythonModel()
    model.initialize(
        {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True)}
    )
    assert model._generate._url == 'http://127.0.0.1:9/"x"/v1/generate'
    assert model._generate._timeout_s == 42


def _bytes_array(text: str) -> Any:
    import numpy as np

    return np.array([text.encode()], dtype=np.object_)


def test_a_template_file_a_folder_with_tokenizer_config_and_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    rendered = ChatTemplate.load(tmp_path / "t.jinja").render([{"role": "user", "content": "x"}])
    assert rendered == "[x]"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": "{{ bos_token }}{{ messages[0]['content'] }}", "bos_token": "<s>"}
        )
    )
    assert ChatTemplate.load(folder).render([{"role": "user", "content": "y"}]) == "<s>y"
    with pytest.raises(ConfigurationError, match="no chat template"):
        ChatTemplate.load(tmp_path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        ChatTemplate.load(tmp_path / "nope.jinja")


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MEDVLM_JOB__MODEL_ENDPOINT", "triton")
    monkeypatch.setenv("MEDVLM_JOB__TRITON__URL", "triton.radiology.local:8001")
    monkeypatch.setenv("MEDVLM_JOB__TRITON__PROTOCOL", "grpc")
    monkeypatch.setenv("MEDVLM_JOB__TRITON__MODEL_NAME", "med_vlm")
    monkeypatch.setenv("MEDVLM_JOB__TRITON__MODEL_VERSION", "3")
    monkeypatch.setenv("MEDVLM_JOB__TRITON__READ_TIMEOUT_S", "120")
    settings = MedvlmSettings(home=tmp_path)
    triton = settings.job.triton
    assert settings.job.model_endpoint == "triton"
    assert (triton.url, triton.protocol, triton.model_name, triton.model_version) == (
        "triton.radiology.local:8001",
        "grpc",
        "med_vlm",
        "3",
    )
    assert triton.read_timeout_s == 120
    assert settings.dev.triton_venv == tmp_path / "triton-venv"
    with pytest.raises(ValidationError):
        TritonSettings(protocol="websocket")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        TritonSettings(model_version="latest")


def test_addresses_as_tritonclient_takes_them() -> None:
    assert triton_address(TritonSettings(url="127.0.0.1:8000")) == ("127.0.0.1:8000", False)
    assert triton_address(TritonSettings(url="http://h:8000/")) == ("h:8000", False)
    assert triton_address(TritonSettings(url="https://h:8443")) == ("h:8443", True)
    with pytest.raises(ConfigurationError, match="required"):
        triton_address(TritonSettings())
    with pytest.raises(ConfigurationError, match="not host:port"):
        triton_address(TritonSettings(url="http://h:8000/v2/models"))


def test_no_chat_template_is_a_configuration_error_naming_the_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"job\.triton\.chat_template"):
        build_triton_drafter(
            TritonSettings(url="127.0.0.1:1"), model_source="hub/model", max_tokens=8, seed=0
        )


def test_what_is_retried() -> None:
    # HTTP (the generate endpoint's answers, httpx's transport errors)
    assert retryable(TritonAnswerError(503, "busy"))
    assert retryable(TritonAnswerError(429, "too many"))
    assert retryable(httpx.ConnectError("refused"))
    assert retryable(httpx.ReadTimeout("slow"))
    assert not retryable(TritonAnswerError(400, "unknown model"))
    # gRPC (the stream's status; an in-stream error message has none and is not retried)
    assert retryable(InferenceServerException("down", status="StatusCode.UNAVAILABLE"))
    assert not retryable(InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT"))
    assert not retryable(InferenceServerException("model failed"))
    assert retryable(ConnectionRefusedError())
    assert retryable(TimeoutError())
    assert not retryable(ValueError("x"))


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_nothing_listening_is_retried_then_one_clear_error_naming_the_study(
    protocol: str, tiny_model_dir: Path
) -> None:
    """A real refused connection (a loopback port nobody listens on): attempts with backoff
    within the budget, then EngineUnavailableError naming the study and the server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = TritonSettings(
        url=f"127.0.0.1:{port}",
        protocol=protocol,  # type: ignore[arg-type]
        retry_attempts=3,
        retry_initial_backoff_s=0.3,
        retry_max_backoff_s=0.3,
        retry_budget_s=10,
        connect_timeout_s=2,
    )
    drafter = TritonDrafter(settings, ChatTemplate.load(tiny_model_dir), max_tokens=8)

    async def go() -> None:
        try:
            await drafter.draft(_model_input(images=1))
        finally:
            await drafter.aclose()

    started = time.monotonic()
    with pytest.raises(EngineUnavailableError) as caught:
        asyncio.run(go())
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith(f"study-0a1b2c: Triton {protocol} 127.0.0.1:{port}")
    assert "unavailable" in message or "unreachable" in message
    assert elapsed >= 0.5  # two backoffs of ~0.3 s (plus jitter): it was retried

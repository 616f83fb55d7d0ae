"""The tiny random-weight checkpoint: deterministic, idempotent, and loadable like a real one."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from medvlm.dev.tiny_model import (
    MARKER_FILE,
    Architecture,
    build_tiny_checkpoint,
    read_marker,
    weights_sha256,
)
from medvlm.errors import ConfigurationError

pytestmark = pytest.mark.unit

ARCHITECTURES: tuple[Architecture, ...] = ("qwen2_vl", "gemma3")

# What each architecture's chat template renders for one image part, before the processor
# expands it to the image's soft tokens.
IMAGE_PLACEHOLDER = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "gemma3": "<start_of_image>",
}
# Qwen2-VL: at most 224*224 px in 14 px patches merged 2x2; Gemma 3: a fixed 16 soft tokens.
MAX_IMAGE_TOKENS = {"qwen2_vl": 64, "gemma3": 16}

REPORT_TEXT = (
    "FINDINGS: Small left pleural effusion. No pneumothorax. Heart size is normal.\n"
    '{"rationale":"Blunted left costophrenic angle.","findings":[{"name":"pleural_effusion",'
    '"presence":"present","laterality":"left","location":"left base","severity":"mild",'
    '"detail":"Meniscus sign, 5 mm ± 1."}],"impression":"Small left effusion.","critical":false,'
    '"recommendation":"none"}\n'
    "Unseen text: Lungenödem, épanchement, 胸水, tabs\tand  double  spaces."
)


def openai_messages(image_part: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "You are a radiology assistant."},
        {
            "role": "user",
            "content": [image_part, {"type": "text", "text": "Describe the radiograph."}],
        },
    ]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_checkpoint(root / arch, arch, seed=0) for arch in ARCHITECTURES}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_same_seed_builds_byte_identical_weights_and_tokenizer(
    architecture: Architecture, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    first = checkpoints[architecture]
    second = build_tiny_checkpoint(tmp_path / "again", architecture, seed=0)

    assert weights_sha256(second) == weights_sha256(first)
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()


def test_different_seed_builds_different_weights(
    checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    other = build_tiny_checkpoint(tmp_path / "seed1", "qwen2_vl", seed=1)

    assert weights_sha256(other) != weights_sha256(checkpoints["qwen2_vl"])


def test_marker_records_what_was_built(checkpoints: dict[str, Path]) -> None:
    marker = read_marker(checkpoints["gemma3"])

    assert marker is not None
    assert marker["architecture"] == "gemma3"
    assert marker["seed"] == 0
    assert marker["weights_sha256"] == weights_sha256(checkpoints["gemma3"])


def test_rebuild_returns_complete_checkpoint_untouched(tmp_path: Path) -> None:
    out = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_vl")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_vl")

    assert again == out
    assert {p.name: p.stat().st_mtime_ns for p in again.iterdir()} == before


def test_incomplete_checkpoint_is_rebuilt(tmp_path: Path) -> None:
    out = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_vl")
    expected = weights_sha256(out)
    (out / "tokenizer.json").unlink()
    (out / "model.safetensors").write_bytes(b"truncated")

    build_tiny_checkpoint(out, "qwen2_vl")

    assert (out / "tokenizer.json").is_file()
    assert weights_sha256(out) == expected
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def test_checkpoint_with_other_seed_is_replaced(tmp_path: Path) -> None:
    out = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_vl", seed=0)

    build_tiny_checkpoint(out, "qwen2_vl", seed=3)

    marker = read_marker(out)
    assert marker is not None
    assert marker["seed"] == 3


def test_foreign_directory_is_never_replaced(tmp_path: Path) -> None:
    foreign = tmp_path / "real-model"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"precious")

    with pytest.raises(ConfigurationError, match="not a tiny checkpoint"):
        build_tiny_checkpoint(foreign, "qwen2_vl")
    assert (foreign / "model.safetensors").read_bytes() == b"precious"
    assert not (foreign / MARKER_FILE).exists()


def test_weights_hash_of_single_file_checkpoint_is_its_sha256sum(
    checkpoints: dict[str, Path],
) -> None:
    weights = checkpoints["qwen2_vl"] / "model.safetensors"

    assert weights_sha256(weights.parent) == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_weights_hash_covers_every_shard_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"second")
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"first")

    assert weights_sha256(tmp_path) == hashlib.sha256(b"firstsecond").hexdigest()


def test_weights_hash_of_directory_without_weights_is_a_configuration_error(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigurationError, match=r"no \*\.safetensors"):
        weights_sha256(tmp_path)


def test_checkpoint_is_small_and_bfloat16(checkpoints: dict[str, Path]) -> None:
    for path in checkpoints.values():
        assert (path / "model.safetensors").stat().st_size < 4 * 2**20
        assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize(
    "image_part",
    [
        {"type": "image"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ],
    ids=["image", "image_url"],
)
def test_chat_template_renders_image_placeholder_and_system_prompt(
    architecture: Architecture, image_part: dict[str, Any], checkpoints: dict[str, Path]
) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(checkpoints[architecture])
    tokenizer = AutoTokenizer.from_pretrained(checkpoints[architecture])
    messages = openai_messages(image_part)

    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    assert rendered.count(IMAGE_PLACEHOLDER[architecture]) == 1
    assert "You are a radiology assistant." in rendered
    assert rendered.index(IMAGE_PLACEHOLDER[architecture]) < rendered.index("Describe")
    # The tokenizer alone (tokenizer_config.json) carries the same template.
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == rendered
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_processor_turns_large_grayscale_image_into_few_image_tokens(
    architecture: Architecture, checkpoints: dict[str, Path]
) -> None:
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoints[architecture])
    config = AutoConfig.from_pretrained(checkpoints[architecture])
    image_token_id = (
        config.image_token_id if architecture == "qwen2_vl" else config.image_token_index
    )
    prompt = processor.apply_chat_template(
        openai_messages({"type": "image"}), tokenize=False, add_generation_prompt=True
    )
    radiograph = Image.new("L", (512, 512), color=90)

    inputs = processor(images=[radiograph], text=[prompt], return_tensors="pt")

    image_tokens = inputs["input_ids"][0].tolist().count(image_token_id)
    assert 0 < image_tokens <= MAX_IMAGE_TOKENS[architecture]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tokenizer_round_trips_report_text(
    architecture: Architecture, checkpoints: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints[architecture])

    ids = tokenizer(REPORT_TEXT, add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == REPORT_TEXT
    assert 600 <= len(tokenizer) <= 1000
    # Trained on report text: schema words are a few pieces, not one byte each.
    assert len(tokenizer("pleural_effusion", add_special_tokens=False)["input_ids"]) <= 4


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_transformers_loads_every_weight_and_generates_from_an_image(
    architecture: Architecture, checkpoints: dict[str, Path]
) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = checkpoints[architecture]
    model, info = AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    processor = AutoProcessor.from_pretrained(path)
    prompt = processor.apply_chat_template(
        openai_messages({"type": "image"}), tokenize=False, add_generation_prompt=True
    )
    inputs = processor(
        images=[Image.new("L", (300, 400), color=200)],
        text=[prompt],
        return_tensors="pt",
        add_special_tokens=False,
    )

    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    assert {key: value for key, value in info.items() if value} == {}
    assert output.shape[1] > inputs["input_ids"].shape[1]


def test_import_loads_no_model_runtime() -> None:
    code = (
        "import sys, medvlm.dev.tiny_model\n"
        "heavy = {'torch', 'transformers', 'tokenizers', 'vllm'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])

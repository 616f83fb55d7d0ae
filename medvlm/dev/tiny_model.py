"""A tiny random-weight vision-language checkpoint, built offline, for tests and the demo.

``build_tiny_checkpoint`` writes a directory that looks exactly like a Hugging Face checkpoint of a
real architecture that vLLM serves (Qwen2-VL, the base of Med-R1; Gemma 3, the base of MedGemma):
``config.json``, ``model.safetensors``, a tokenizer with the architecture's real special tokens and
chat template, the image processor's configuration and a ``generation_config.json``. Production
loads real checkpoints by path or hub id through the same loading code; tests and the demo load
this one, so they exercise real vLLM (image preprocessing, the vision tower, guided decoding)
without downloading weights and without network access.

The weights are random. The model's drafts mean nothing: they are only shaped like reports because
guided decoding forces the report schema. Nothing built here may ever be used to read an image.

The build is deterministic for a given seed and library versions (same bytes for
``model.safetensors`` and ``tokenizer.json``), takes seconds and a few MB, and is atomic: the
checkpoint is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written checkpoint. Importing this module is cheap: torch, transformers and
tokenizers are imported only when a checkpoint is built.

Its marker file and the weights hash are production code (``serving.model_source``): a served
model is recognised as this random-weight one by the marker, whatever its path.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

from medvlm.errors import ConfigurationError
from medvlm.settings import MedvlmSettings
from serving.model_source import MARKER_FILE, read_marker, weights_sha256

if TYPE_CHECKING:
    from transformers import ProcessorMixin, TokenizersBackend

__all__ = [
    "BUILDER_VERSION",
    "MARKER_FILE",
    "Architecture",
    "build_tiny_checkpoint",
    "read_marker",
    "weights_sha256",
    "with_tiny_checkpoint",
]

Architecture = Literal["qwen2_vl", "gemma3"]

# Bump when anything that changes the built files changes (sizes, corpus, tokenizer, templates):
# an existing checkpoint with another version is rebuilt instead of reused.
BUILDER_VERSION: Final = 1

# Text sizes. vLLM's CPU attention accepts only some head sizes (16 fails, 64 works), so the text
# model keeps head_dim 64 with 2 query heads and 1 KV head (grouped-query, like the real models).
_TEXT_HIDDEN: Final = 128
_TEXT_INTERMEDIATE: Final = 256
_TEXT_LAYERS: Final = 2
_TEXT_HEADS: Final = 2
_TEXT_KV_HEADS: Final = 1
_HEAD_DIM: Final = 64
_MAX_POSITIONS: Final = 8192
_VOCAB_TARGET: Final = 768
# The released checkpoints are bfloat16, and vLLM's CPU backend runs bfloat16 (it would downcast a
# float32 checkpoint anyway, warning once per tensor).
_DTYPE: Final = "bfloat16"

# Vision sizes: two layers, a narrow embedding; images cost few tokens.
_VISION_DEPTH: Final = 2
_VISION_EMBED: Final = 32
_VISION_HEADS: Final = 2
# Qwen2-VL resizes so that min <= h*w <= max (in multiples of 28): 224*224 gives at most
# 16*16 patches of 14 px, merged 2x2 into 64 image tokens.
_QWEN_MIN_PIXELS: Final = 56 * 56
_QWEN_MAX_PIXELS: Final = 224 * 224
# Gemma 3 resizes every image to a square; 112 px in 14 px patches is 8x8 patches, average-pooled
# to 4x4 = 16 soft tokens per image.
_GEMMA_IMAGE_SIZE: Final = 112
_GEMMA_PATCH: Final = 14
_GEMMA_TOKENS_PER_IMAGE: Final = 16
_GEMMA_SLIDING_WINDOW: Final = 512

# Synthetic report-style English to train the tokenizer on. Invented text, no patient data. It
# carries the report schema's field names and enum values so JSON drafts tokenize compactly.
_CORPUS: Final = """\
FINDINGS: The lungs are clear. No pleural effusion or pneumothorax. Heart size is normal. The
mediastinal and hilar contours are within normal limits. No acute osseous abnormality.
IMPRESSION: No acute cardiopulmonary process.

FINDINGS: There is mild cardiomegaly. Small bilateral pleural effusions with adjacent basilar
atelectasis. No focal consolidation. No pneumothorax. Mild pulmonary vascular congestion.
IMPRESSION: Mild cardiomegaly with small bilateral pleural effusions, likely mild interstitial
edema. Recommend clinical correlation and follow-up radiograph after diuresis.

FINDINGS: Patchy opacity in the right lower lobe, concerning for pneumonia in the appropriate
clinical setting. The left lung is clear. No pleural effusion. The cardiac silhouette is normal in
size. Degenerative changes of the thoracic spine.
IMPRESSION: Right lower lobe opacity, possibly pneumonia. Follow-up chest radiograph in 6 to 8
weeks is recommended to document resolution.

FINDINGS: Moderate right pneumothorax without tension. The trachea is midline. Endotracheal tube
terminates 4 cm above the carina. Enteric tube courses below the diaphragm. Right internal jugular
central venous catheter tip projects over the superior vena cava. Support devices in place.
IMPRESSION: Moderate right pneumothorax. Critical result communicated to the referring clinician.

FINDINGS: Severe cardiomegaly. Enlarged cardiomediastinum. Diffuse bilateral interstitial and
airspace opacities with perihilar predominance, consistent with pulmonary edema. Moderate left
pleural effusion. Blunting of the right costophrenic angle.
IMPRESSION: Findings consistent with congestive heart failure and moderate pulmonary edema.

FINDINGS: A 2 cm nodular lung lesion in the left upper lobe. No hilar or mediastinal adenopathy.
Acute fracture of the left sixth rib laterally. No pneumothorax. Lungs otherwise clear.
IMPRESSION: Left upper lobe lesion, uncertain significance; recommend CT chest. Left rib fracture.

FINDINGS: Low lung volumes with bibasilar atelectasis. Lung opacity at the left base may represent
atelectasis or consolidation. The heart is top normal in size. No large pleural effusion. Pleural
thickening at the right apex, stable. Calcified granuloma in the right middle lobe.
IMPRESSION: Bibasilar atelectasis. Left basilar consolidation is not excluded.

FINDINGS: Frontal and lateral views of the chest. The lungs are hyperinflated, consistent with
chronic obstructive pulmonary disease. No consolidation, effusion or pneumothorax. Normal heart
size. Aortic knob calcification. Surgical clips in the right upper quadrant.
IMPRESSION: Hyperinflation without acute abnormality. No change from the prior examination.

You are a radiology assistant. Describe the chest radiograph. Report findings as JSON with the
fields rationale, findings, impression, critical and recommendation. Each finding has a name,
presence, laterality, location, severity and detail. The report is a draft for a radiologist.

{"rationale":"The lungs are clear and the heart size is normal.","findings":[{"name":"cardiomegaly",
"presence":"absent","laterality":"not_applicable","location":"heart","severity":"not_applicable",
"detail":"Heart size is normal."},{"name":"pleural_effusion","presence":"present","laterality":
"bilateral","location":"costophrenic angles","severity":"mild","detail":"Small bilateral pleural
effusions."},{"name":"pneumothorax","presence":"uncertain","laterality":"left","location":"apex",
"severity":"moderate","detail":"Possible left apical pneumothorax."},{"name":"lung_opacity",
"presence":"present","laterality":"right","location":"right lower lobe","severity":"severe",
"detail":"Dense opacity."},{"name":"other","presence":"absent","laterality":"midline","location":
"mediastinum","severity":"not_applicable","detail":"Trachea is midline."}],"impression":
"No acute cardiopulmonary process.","critical":false,"recommendation":"none"}
{"name":"enlarged_cardiomediastinum"} {"name":"lung_lesion"} {"name":"edema"} {"name":
"consolidation"} {"name":"pneumonia"} {"name":"atelectasis"} {"name":"pleural_other"} {"name":
"fracture"} {"name":"support_devices"} {"critical":true} {"findings":[]} [1, 2, 3] 0 4 5 7 8 9
present absent uncertain left right bilateral midline not_applicable mild moderate severe
cardiomegaly lung_opacity pleural_effusion pneumothorax enlarged_cardiomediastinum lung_lesion
edema consolidation pneumonia atelectasis pleural_other fracture support_devices other none
"""

# Qwen2-VL's special tokens, in the order of the released tokenizer (after the regular vocabulary).
_QWEN_SPECIAL_TOKENS: Final = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL-Instruct's chat template as released, which renders every image part (``image``,
# ``image_url``) as <|vision_start|><|image_pad|><|vision_end|>; the processor expands the pad.
_QWEN_CHAT_TEMPLATE: Final = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Gemma 3's leading special tokens (ids 0..8 here), then the byte-fallback tokens, the trained
# vocabulary and, last as in the released tokenizer, the image soft token.
_GEMMA_HEAD_TOKENS: Final = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
)
_GEMMA_IMAGE_TOKEN: Final = "<image_soft_token>"

# Gemma 3's released chat template, with ``image_url`` parts accepted beside ``image`` parts. An
# image part renders as <start_of_image>; the processor expands it to the soft tokens.
_GEMMA_CHAT_TEMPLATE: Final = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' or item['type'] == 'image_url' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)

# Files every built checkpoint has; the marker is written last and checked first.
_REQUIRED_FILES: Final = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
)


def build_tiny_checkpoint(
    out_dir: Path, architecture: Architecture = "qwen2_vl", seed: int = 0
) -> Path:
    """Build (or reuse) a tiny random-weight checkpoint of ``architecture`` in ``out_dir``.

    If ``out_dir`` already holds a complete checkpoint built by this builder version with the same
    architecture and seed, it is returned untouched. An incomplete or different tiny checkpoint
    there is replaced; any other existing content raises ``ConfigurationError`` (never deleted).
    Returns ``out_dir``.
    """
    if architecture not in get_args(Architecture):
        raise ConfigurationError(f"unknown tiny architecture {architecture!r}")
    out_dir = Path(out_dir)
    if _is_complete(out_dir, architecture, seed):
        return out_dir
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _write_checkpoint(staging, architecture, seed)
        _install(staging, out_dir, architecture, seed)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _is_complete(out_dir: Path, architecture: Architecture, seed: int) -> bool:
    marker = read_marker(out_dir)
    if marker is None:
        return False
    if (marker.get("architecture"), marker.get("seed"), marker.get("builder_version")) != (
        architecture,
        seed,
        BUILDER_VERSION,
    ):
        return False
    if not all((out_dir / name).is_file() for name in _REQUIRED_FILES):
        return False
    return bool(marker.get("weights_sha256") == weights_sha256(out_dir))


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigurationError(f"tiny checkpoint path {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and read_marker(out_dir) is None:
        raise ConfigurationError(
            f"{out_dir} is not empty and is not a tiny checkpoint; refusing to replace it"
        )


def _install(staging: Path, out_dir: Path, architecture: Architecture, seed: int) -> None:
    """Move the finished ``staging`` directory to ``out_dir`` with renames only."""
    _make_readable(staging)
    if _is_complete(out_dir, architecture, seed):
        return  # a concurrent builder finished first; keep its (identical) checkpoint in place
    if out_dir.exists():
        # An old, partial or different tiny checkpoint (checked by the caller): move it aside
        # first so ``out_dir`` is never half old, half new.
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        try:
            os.replace(out_dir, retired / "checkpoint")
        finally:
            shutil.rmtree(retired, ignore_errors=True)
    try:
        os.rename(staging, out_dir)
    except OSError:
        # A concurrent builder won the race; its checkpoint is as good as ours if complete.
        if _is_complete(out_dir, architecture, seed):
            return
        raise


def _make_readable(directory: Path) -> None:
    """Give the staged files the usual permissions (mkdtemp and the writers create them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _write_checkpoint(target: Path, architecture: Architecture, seed: int) -> None:
    if architecture == "qwen2_vl":
        processor = _qwen2_vl_processor()
        _save_qwen2_vl_model(target, processor.tokenizer, seed)
    else:
        processor = _gemma3_processor()
        _save_gemma3_model(target, processor.tokenizer, seed)
    # Layout of the released repositories, readable by transformers 4.x and 5.x alike: the image
    # processor in preprocessor_config.json, the chat template in chat_template.jinja (the
    # processor's) and in tokenizer_config.json (for readers of the tokenizer alone). The
    # tokenizer is saved last because the processor rewrites tokenizer_config.json.
    processor.save_pretrained(target)
    processor.image_processor.save_pretrained(target)
    processor.tokenizer.save_pretrained(target, save_jinja_files=False)
    marker = {
        "architecture": architecture,
        "seed": seed,
        "builder_version": BUILDER_VERSION,
        "weights_sha256": weights_sha256(target),
        "purpose": "random weights for tests and demos; outputs mean nothing",
        # The bytes depend on these too (initialisers, serialisation); informational only.
        "libraries": {name: version(name) for name in ("torch", "transformers", "tokenizers")},
    }
    (target / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _train_byte_level_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE with Qwen2's pre-tokenization."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    trainer_tokenizer = Tokenizer(BPE())
    trainer_tokenizer.normalizer = normalizers.NFC()
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = BpeTrainer(
        vocab_size=_VOCAB_TARGET,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    return _vocab_and_merges(trainer_tokenizer.to_str())


def _train_byte_fallback_bpe(head: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece-style BPE (``▁`` for spaces, byte fallback).

    ``head`` takes ids 0..len(head)-1, the 256 ``<0xXX>`` byte tokens follow, then the learned
    pieces. This is the layout ``GemmaTokenizer`` rebuilds from vocabulary and merges.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    trainer_tokenizer = Tokenizer(BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    # Learn pieces within words (a leading ``▁`` belongs to the word, as in SentencePiece); the
    # merges then apply unchanged to Gemma's unsplit input.
    trainer_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="never", split=True
    )
    byte_tokens = [f"<0x{value:02X}>" for value in range(256)]
    trainer = BpeTrainer(
        vocab_size=_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=[*head, *byte_tokens],
        show_progress=False,
    )
    trainer_tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    vocab, merges = _vocab_and_merges(trainer_tokenizer.to_str())
    # Runs of one to four newlines are single pieces in Gemma's vocabulary, and vLLM's Gemma 3
    # prompt processing looks them up by text (it re-merges the "\n\n" around image tokens).
    newline_merges = [("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n")]
    for piece in ("\n", "\n\n", "\n\n\n", "\n\n\n\n"):
        vocab.setdefault(piece, len(vocab))
    return vocab, newline_merges + [m for m in merges if m not in newline_merges]


def _vocab_and_merges(tokenizer_json: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(tokenizer_json)["model"]
    vocab = {str(token): int(index) for token, index in model["vocab"].items()}
    merges = [
        (str(merge[0]), str(merge[1])) if isinstance(merge, list) else tuple(merge.split(" ", 1))
        for merge in model["merges"]
    ]
    return vocab, [(left, right) for left, right in merges]


def _token_id(tokenizer: TokenizersBackend, token: str) -> int:
    """The id of a token that must be a single entry of the vocabulary."""
    index = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(index, int) or tokenizer.convert_ids_to_tokens(index) != token:
        raise ConfigurationError(f"tiny tokenizer lacks the token {token!r}")
    return index


def _qwen2_vl_tokenizer() -> TokenizersBackend:
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_byte_level_bpe()
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    # Keyword arguments as a dict: transformers annotates ``merges`` as strings and ``unk_token``
    # as required, while the tokenizers backend takes pairs and Qwen2 has no unknown token.
    options: dict[str, Any] = {"vocab": vocab, "merges": merges, "unk_token": None}
    tokenizer: TokenizersBackend = Qwen2Tokenizer(
        **options,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in _QWEN_SPECIAL_TOKENS if t != "<|endoftext|>"],
        model_max_length=_MAX_POSITIONS,
        errors="replace",
        split_special_tokens=False,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    return tokenizer


def _qwen2_vl_processor() -> ProcessorMixin:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(
        min_pixels=_QWEN_MIN_PIXELS, max_pixels=_QWEN_MAX_PIXELS
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=_QWEN_MIN_PIXELS, max_pixels=_QWEN_MAX_PIXELS
    )
    processor: ProcessorMixin = Qwen2VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=_qwen2_vl_tokenizer(),
        video_processor=video_processor,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    return processor


def _save_qwen2_vl_model(target: Path, tokenizer: TokenizersBackend, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    def ids(token: str) -> int:
        return _token_id(tokenizer, token)

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": _TEXT_INTERMEDIATE,
            "num_hidden_layers": _TEXT_LAYERS,
            "num_attention_heads": _TEXT_HEADS,
            "num_key_value_heads": _TEXT_KV_HEADS,
            "max_position_embeddings": _MAX_POSITIONS,
            "max_window_layers": _TEXT_LAYERS,
            # Multimodal RoPE: temporal/height/width sections of head_dim / 2 = 32 frequencies.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": [8, 12, 12],
            },
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": _VISION_DEPTH,
            "embed_dim": _VISION_EMBED,
            "hidden_size": _TEXT_HIDDEN,
            "num_heads": _VISION_HEADS,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True,
        dtype=_DTYPE,
    )
    generation = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
        do_sample=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)  # type: ignore[no-untyped-call]
    model = model.to(getattr(torch, _DTYPE))
    model.generation_config = generation
    model.save_pretrained(target)


def _gemma3_tokenizer() -> TokenizersBackend:
    from transformers import GemmaTokenizer

    vocab, merges = _train_byte_fallback_bpe(list(_GEMMA_HEAD_TOKENS))
    vocab[_GEMMA_IMAGE_TOKEN] = len(vocab)
    options: dict[str, Any] = {"vocab": vocab, "merges": merges}
    tokenizer: TokenizersBackend = GemmaTokenizer(
        **options,
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": _GEMMA_IMAGE_TOKEN,
        },
        model_max_length=_MAX_POSITIONS,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=_GEMMA_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]},
        replace_extra_special_tokens=False,
    )
    return tokenizer


def _gemma3_processor() -> ProcessorMixin:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    image_processor = Gemma3ImageProcessor(
        size={"height": _GEMMA_IMAGE_SIZE, "width": _GEMMA_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor: ProcessorMixin = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=_gemma3_tokenizer(),
        chat_template=_GEMMA_CHAT_TEMPLATE,
        image_seq_length=_GEMMA_TOKENS_PER_IMAGE,
    )
    return processor


def _save_gemma3_model(target: Path, tokenizer: TokenizersBackend, seed: int) -> None:
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GenerationConfig

    def ids(token: str) -> int:
        return _token_id(tokenizer, token)

    config = Gemma3Config(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": _TEXT_HIDDEN,
            "intermediate_size": _TEXT_INTERMEDIATE,
            "num_hidden_layers": _TEXT_LAYERS,
            "num_attention_heads": _TEXT_HEADS,
            "num_key_value_heads": _TEXT_KV_HEADS,
            "head_dim": _HEAD_DIM,
            "query_pre_attn_scalar": _HEAD_DIM,
            "max_position_embeddings": _MAX_POSITIONS,
            "sliding_window": _GEMMA_SLIDING_WINDOW,
            # One local (sliding-window) and one global layer, the two kinds Gemma 3 interleaves.
            "layer_types": ["sliding_attention", "full_attention"],
            "pad_token_id": ids("<pad>"),
            "eos_token_id": ids("<eos>"),
            "bos_token_id": ids("<bos>"),
        },
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": _VISION_EMBED,
            "intermediate_size": _VISION_EMBED * 2,
            "num_hidden_layers": _VISION_DEPTH,
            "num_attention_heads": _VISION_HEADS,
            "image_size": _GEMMA_IMAGE_SIZE,
            "patch_size": _GEMMA_PATCH,
            "vision_use_head": False,
        },
        mm_tokens_per_image=_GEMMA_TOKENS_PER_IMAGE,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids(_GEMMA_IMAGE_TOKEN),
        tie_word_embeddings=True,
        dtype=_DTYPE,
    )
    generation = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=ids("<bos>"),
        eos_token_id=[ids("<eos>"), ids("<end_of_turn>")],
        pad_token_id=ids("<pad>"),
        do_sample=False,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    model = model.to(getattr(torch, _DTYPE))
    model.generation_config = generation
    model.save_pretrained(target)
    _restore_released_siglip_names(target / "model.safetensors")


def _restore_released_siglip_names(weights_file: Path) -> None:
    """Rename ``vision_tower.*`` weights to the released ``vision_tower.vision_model.*``.

    transformers 5.19 saves Gemma 3's SigLIP tower without the ``vision_model`` level that the
    released checkpoints (and so vLLM 0.32's weight loader) have; transformers reads both.
    """
    from safetensors.torch import load_file, save_file

    prefix, released = "vision_tower.", "vision_tower.vision_model."
    tensors = load_file(weights_file)
    if not any(k.startswith(prefix) and not k.startswith(released) for k in tensors):
        return
    renamed = {
        (released + k.removeprefix(prefix))
        if k.startswith(prefix) and not k.startswith(released)
        else k: tensor
        for k, tensor in tensors.items()
    }
    save_file(renamed, weights_file, metadata={"format": "pt"})


def with_tiny_checkpoint(settings: MedvlmSettings) -> MedvlmSettings:
    """``settings`` naming the tiny checkpoint (built under MEDVLM_HOME if needed) as the model
    source, when no source is set and random weights are allowed; otherwise unchanged (and
    ``serving.model_source.resolve_model`` then refuses a missing source)."""
    model = settings.model
    if model.source is not None or not model.allow_random_weights:
        return settings
    path = build_tiny_checkpoint(
        settings.models_dir / f"tiny-{model.tiny_architecture}",
        architecture=model.tiny_architecture,
        seed=0,
    )
    tiny = model.model_copy(update={"source": str(path)})
    return settings.model_copy(update={"model": tiny})

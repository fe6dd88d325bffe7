"""Build tiny random-weight vision-language checkpoints that mlx-vlm loads offline.

Each ``build_<family>(out, seed)`` writes a folder in the Hugging Face / mlx-community
layout (config.json, model.safetensors in MLX layout, tokenizer.json, tokenizer_config.json
with the chat template, chat_template.json/.jinja, preprocessor/processor_config.json, ...)
that ``mlx_vlm.utils.load(path)`` loads and ``mlx_vlm.generate.stream_generate(model,
processor, prompt, image=[pil], max_tokens=8, temperature=0)`` runs on CPU in ~0.1 s.
A build takes < 0.1 s once ``mlx_vlm`` is imported (the first import costs seconds) and
writes ~1 MB of float32 weights. The tokenizer is ``tests.tiny_model.train_tokenizer()``
plus the family's special tokens; config token ids are read back from it. Random weights
give degenerate but deterministic greedy output. Set ``HF_HUB_OFFLINE=1``.

``FAMILIES`` lists the working builders: qwen2_5_vl, gemma3, smolvlm, gemma4.
``AUDIO_FAMILIES``: gemma4 (E2B-style conformer audio tower). Pass audio as
``stream_generate(model, processor, prompt, audio=[np.float32 mono array at 16 kHz])``
with ``prompt = apply_chat_template(processor, config, text, num_audios=1)``; one audio
token per 40 ms (0.5 s -> 13 tokens), several audios per prompt are supported. gemma3n is
not feasible tiny (its MobileNetV5 vision tower is hard-coded, up to 2048 channels);
phi4mm and qwen3_omni_moe were not needed once gemma4 worked.
``PRECOMPUTED_INPUT_FAMILIES``: llava, whose prepare_inputs is broken upstream (see there).

Pitfalls: stream_generate's last result repeats the final token (use its ``token_ids``);
mlx-vlm's gemma3 reads ``mm_tokens_per_image`` from text_config only and its mask code
needs ``sliding_window_pattern <= num_hidden_layers``; vision hidden sizes must be >=
patch size or ``sanitize`` re-transposes the conv weight; Qwen2.5-VL text params live at
the config root; the Gemma 4 checkpoint (4 soft tokens per image) only loads through
mlx-vlm's own processor: transformers' Gemma4ImageProcessor accepts 70/140/280/560/1120,
and mlx-vlm silently falls back to it if its processor raises (e.g. under ``-W error``,
as the feature extractor warns about an all-zero mel filter).

Run ``python -m tests.tiny_vlm OUT_DIR [FAMILY ...]`` to build and generate from each.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import AddedToken, Tokenizer

from tests.tiny_model import train_tokenizer

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def write_json(path: Path, data: dict) -> None:
    """Dump ``data`` as indented JSON."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def make_tokenizer(special: list[str]) -> tuple[Tokenizer, dict[str, int]]:
    """Train the tiny BPE tokenizer, add ``special`` tokens, return it and all special ids."""
    tok = train_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    return tok, ids


def write_tokenizer(out: Path, tok: Tokenizer, template: str, jinja: bool, **config) -> None:
    """Write tokenizer.json, tokenizer_config.json and the chat template file."""
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {
            "content": t.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.special,
        }
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "bos_token": None,
            "unk_token": None,
            "clean_up_tokenization_spaces": False,
            "split_special_tokens": False,
            "model_max_length": 4096,
            **config,
            "chat_template": template,
        },
    )
    if jinja:
        (out / "chat_template.jinja").write_text(template)
    else:
        write_json(out / "chat_template.json", {"chat_template": template})


def save_model(out: Path, config: dict, seed: int, drop: tuple[str, ...] = ()) -> None:
    """Write config.json and random MLX-layout weights for mlx-vlm's model of ``config``."""
    from mlx_vlm.utils import get_model_and_args, update_module_configs

    write_json(out / "config.json", config)
    arch, _ = get_model_and_args(config)
    cfg = json.loads(json.dumps(config))
    for key in ("text_config", "vision_config", "audio_config"):
        cfg.setdefault(key, {})
    model_config = arch.ModelConfig.from_dict(cfg)
    modules = ["text", "vision", "perceiver", "projector", "audio"]
    model_config = update_module_configs(model_config, arch, cfg, modules)
    mx.random.seed(seed)
    model = arch.Model(model_config)
    weights = {k: v for k, v in tree_flatten(model.parameters()) if k not in drop}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def save_image_processor(out: Path, name: str, **kwargs) -> None:
    """Save a transformers image processor (PIL backend, no torch) as preprocessor_config.json."""
    import transformers

    getattr(transformers, name)(**kwargs).save_pretrained(str(out))


# --------------------------------------------------------------------------- Qwen2.5-VL

QWEN_VISION_TOKENS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL chat template (trimmed): renders {"type": "image"} / {"type": "video"} parts.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen25_vl(
    out: Path,
    seed: int = 0,
    *,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    heads: int = 4,
    kv_heads: int = 2,
    mrope_section: tuple = (2, 3, 3),
    vision_depth: int = 2,
    vision_hidden: int = 32,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    fullatt_blocks: tuple = (1,),
    window_size: int = 56,
    pixels: tuple = (56 * 56, 112 * 112),
) -> Path:
    """Qwen2.5-VL: text params at the config root, <=16 merged image tokens, video config.
    The keyword arguments size it (scripts/bench_vision.py builds bigger ones); mrope_section
    sums to head_dim / 2; `pixels` is the image processor's (min, max)."""
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = make_tokenizer(QWEN_VISION_TOKENS)
    write_tokenizer(
        out,
        tok,
        QWEN_CHAT_TEMPLATE,
        jinja=False,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        # transformers 5 / mlx-vlm read these as tokenizer.image_token(_id):
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    # mlx-vlm's own numpy Qwen3VLImageProcessor reads these keys.
    write_json(
        out / "preprocessor_config.json",
        {
            "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor",
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": pixels[0],
            "max_pixels": pixels[1],  # 112² px: <= 16 merged tokens per image
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
        },
    )
    write_json(
        out / "video_preprocessor_config.json",
        {
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
            "min_pixels": pixels[0],
            "max_pixels": pixels[1],
            "fps": 2.0,
            "min_frames": 2,
            "max_frames": 8,
        },
    )
    config = {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        # Text params at the ROOT: ModelConfig.from_dict copies root -> text_config.
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": intermediate,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 4096,
        "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": list(mrope_section)},
        "tie_word_embeddings": True,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "vision_config": {
            "model_type": "qwen2_5_vl",
            "depth": vision_depth,
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "out_hidden_size": hidden,
            "num_heads": vision_heads,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": window_size,
            "fullatt_block_indexes": list(fullatt_blocks),  # the others: windowed attention
            "in_channels": 3,
            "tokens_per_second": 2,
        },
    }
    save_model(out, config, seed)
    return out


# --------------------------------------------------------------------------- Gemma 3

GEMMA3_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# google/gemma-3-4b-it's template: the system prompt is folded into the first user turn.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""


def build_gemma3(out: Path, seed: int = 0) -> Path:
    """Gemma 3: SigLIP tower on 56 px images (4x4 patches) pooled to 4 soft tokens."""
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = make_tokenizer(GEMMA3_TOKENS)
    write_tokenizer(
        out,
        tok,
        GEMMA3_CHAT_TEMPLATE,
        jinja=True,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos_token=False,  # the template renders <bos>
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
    )
    image_size, mm_tokens = 56, 4
    save_image_processor(
        out,
        "Gemma3ImageProcessor",
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    write_json(
        out / "processor_config.json",
        {"image_seq_length": mm_tokens, "processor_class": "Gemma3Processor"},
    )
    eos = [ids["<eos>"], ids["<end_of_turn>"]]
    write_json(
        out / "generation_config.json",
        {"bos_token_id": ids["<bos>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]},
    )
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"],
        "image_token_index": ids["<image_soft_token>"],
        "eos_token_id": eos,
        "pad_token_id": ids["<pad>"],
        "mm_tokens_per_image": mm_tokens,
        "text_config": {
            "model_type": "gemma3_text",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "rms_norm_eps": 1e-6,
            "vocab_size": tok.get_vocab_size(),
            "rope_global_base_freq": 1e6,
            "rope_local_base_freq": 1e4,
            "sliding_window": 512,
            # mlx-vlm's cache/mask code indexes layer ``pattern - 1``: keep it <= layers.
            "sliding_window_pattern": 2,
            # mlx-vlm reads this from text_config only (HF keeps it at the root).
            "mm_tokens_per_image": mm_tokens,
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "num_hidden_layers": 2,
            "hidden_size": 32,  # >= patch_size, or sanitize re-transposes the conv weight
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": image_size,
            "layer_norm_eps": 1e-6,
        },
    }
    # Real Gemma 3 checkpoints tie lm_head to embed_tokens; sanitize re-creates it on load.
    save_model(out, config, seed, drop=("language_model.lm_head.weight",))
    return out


# --------------------------------------------------------------------------- SmolVLM

SMOLVLM_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)],
]

# HuggingFaceTB/SmolVLM2 template, plus a branch for plain string content (the original
# indexes content[0]['type'] and would render string content as nothing).
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}"
    "{% endif %}{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}"
    "{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_smolvlm(out: Path, seed: int = 0) -> Path:
    """SmolVLM(2): SigLIP tower on 56 px images, pixel shuffle x2 -> 4 tokens, no splitting."""
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = make_tokenizer(SMOLVLM_TOKENS)
    write_tokenizer(
        out,
        tok,
        SMOLVLM_CHAT_TEMPLATE,
        jinja=True,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    image_size, patch, scale = 56, 14, 2
    save_image_processor(
        out,
        "SmolVLMImageProcessor",
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
        do_image_splitting=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_seq_len = (image_size // patch) ** 2 // scale**2
    write_json(
        out / "processor_config.json",
        {"image_seq_len": image_seq_len, "processor_class": "SmolVLMProcessor"},
    )
    eos = ids["<end_of_utterance>"]
    config = {
        "model_type": "smolvlm",
        "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": ids["<image>"],
        "scale_factor": scale,
        "vocab_size": tok.get_vocab_size(),
        "eos_token_id": eos,
        "pad_token_id": ids["<|im_end|>"],
        "text_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e5,
            "vocab_size": tok.get_vocab_size(),
            "max_position_embeddings": 4096,
        },
        "vision_config": {
            "model_type": "smolvlm_vision",
            "num_hidden_layers": 2,
            "hidden_size": 32,  # >= patch_size, or sanitize re-transposes the conv weight
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "patch_size": patch,
            "image_size": image_size,
        },
    }
    save_model(out, config, seed)
    return out


# --------------------------------------------------------------------------- LLaVA 1.5

LLAVA_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

# llava-hf/llava-1.5-7b-hf template (images first, then text), plus string content and a
# plain-text system turn; the original renders only list content.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_llava(out: Path, seed: int = 0) -> Path:
    """LLaVA 1.5: CLIP tower on 56 px images, 16 patch tokens (CLS dropped), MLP projector."""
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = make_tokenizer(LLAVA_TOKENS)
    write_tokenizer(
        out,
        tok,
        LLAVA_CHAT_TEMPLATE,
        jinja=True,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_size, patch = 56, 14
    save_image_processor(
        out,
        "CLIPImageProcessor",
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    write_json(
        out / "processor_config.json",
        {
            "image_token": "<image>",
            "num_additional_image_tokens": 1,  # CLS
            "patch_size": patch,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": "default",
        },
    )
    config = {
        "model_type": "llava",
        "architectures": ["LlavaForConditionalGeneration"],
        "image_token_index": ids["<image>"],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "vocab_size": tok.get_vocab_size(),
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
        "text_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "rms_norm_eps": 1e-5,
            "vocab_size": tok.get_vocab_size(),
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "num_hidden_layers": 2,
            "hidden_size": 32,  # >= patch_size, or sanitize re-transposes the conv weight
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch,
            "projection_dim": 32,
        },
    }
    save_model(out, config, seed)
    return out


# --------------------------------------------------------------------------- Gemma 4 (audio)

GEMMA4_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<|turn>",
    "<turn|>",
    "<|image>",
    "<image|>",
    "<|image|>",
    "<|audio>",
    "<audio|>",
    "<|audio|>",
    "<|video|>",
]

# Trimmed google/gemma-4-E2B-it template: native system turn, model role, media parts
# rendered as <|image|> / <|audio|> / <|video|> (no tools, no thinking channel).
GEMMA4_CHAT_TEMPLATE = """{{- bos_token -}}
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- elif item['type'] == 'image' -%}
                {{- '<|image|>' -}}
            {%- elif item['type'] == 'audio' -%}
                {{- '<|audio|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {{- render_content(messages[0]['content']) -}}
    {{- '<turn|>\n' -}}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<|turn>' + role + '\n' -}}
    {{- render_content(message['content']) -}}
    {{- '<turn|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
"""


def build_gemma4(out: Path, seed: int = 0) -> Path:
    """Gemma 4 (E2B-style): ViT tower, <=4 soft tokens per image, conformer audio tower."""
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = make_tokenizer(GEMMA4_TOKENS)
    write_tokenizer(
        out,
        tok,
        GEMMA4_CHAT_TEMPLATE,
        jinja=True,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos_token=False,  # the template renders <bos>
        extra_special_tokens={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
            "video_token": "<|video|>",
        },
    )
    soft_tokens, patch, pool = 4, 16, 3
    image_processor = {
        "image_processor_type": "Gemma4ImageProcessor",
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "rescale_factor": 1 / 255,
        "patch_size": patch,
        "pooling_kernel_size": pool,
        "max_soft_tokens": soft_tokens,
    }
    write_json(
        out / "processor_config.json",
        {
            "processor_class": "Gemma4Processor",
            "image_processor": image_processor,
            "feature_extractor": {
                "feature_extractor_type": "Gemma4AudioFeatureExtractor",
                "feature_size": 128,
                "sampling_rate": 16000,
            },
            "audio_seq_length": 750,
            "audio_ms_per_token": 40,
        },
    )
    eos = [ids["<eos>"], ids["<turn|>"]]
    write_json(
        out / "generation_config.json",
        {"bos_token_id": ids["<bos>"], "eos_token_id": eos, "pad_token_id": ids["<pad>"]},
    )
    vocab = tok.get_vocab_size()
    config = {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "image_token_id": ids["<|image|>"],
        "audio_token_id": ids["<|audio|>"],
        "video_token_id": ids["<|video|>"],
        "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"],
        "boa_token_id": ids["<|audio>"],
        "eoa_token_id": ids["<audio|>"],
        "eos_token_id": eos,
        "pad_token_id": ids["<pad>"],
        "vision_soft_tokens_per_image": soft_tokens,
        "tie_word_embeddings": True,
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "global_head_dim": 16,
            "num_kv_shared_layers": 0,
            "hidden_size_per_layer_input": 8,
            "vocab_size": vocab,
            "vocab_size_per_layer_input": vocab,
            "use_double_wide_mlp": False,
            "sliding_window": 512,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {
                    "partial_rotary_factor": 0.25,
                    "rope_theta": 1e6,
                    "rope_type": "proportional",
                },
                "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
            },
            "final_logit_softcapping": 30.0,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": True,
        },
        "vision_config": {
            "model_type": "gemma4_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "global_head_dim": 16,
            "patch_size": patch,
            "pooling_kernel_size": pool,
            "position_embedding_size": 64,  # > patches per side
            "default_output_length": soft_tokens,
        },
        "audio_config": {
            "model_type": "gemma4_audio",
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "subsampling_conv_channels": [8, 4],
            "conv_kernel_size": 5,
            "output_proj_dims": 32,
        },
    }
    save_model(out, config, seed)
    return out


Builder = Callable[[Path, int], Path]

# Families that load and run ``stream_generate(model, processor, prompt, image=[...])``.
FAMILIES: dict[str, Builder] = {
    "qwen2_5_vl": build_qwen25_vl,
    "gemma3": build_gemma3,
    "smolvlm": build_smolvlm,
    "gemma4": build_gemma4,
}
# ... of which these also take ``audio=[float32 16 kHz mono np.ndarray]``.
AUDIO_FAMILIES: dict[str, Builder] = {"gemma4": build_gemma4}
# Loads and generates, but mlx-vlm 0.7.10's prepare_inputs fails with transformers 5.x
# (LlavaProcessor forwards ``padding`` to the strict image processor, mlx-vlm issue #870):
# call ``processor(images=..., text=prompt)`` yourself and pass ``input_ids``,
# ``pixel_values`` and ``mask`` to stream_generate.
PRECOMPUTED_INPUT_FAMILIES: dict[str, Builder] = {"llava": build_llava}


def run_family(path: Path, audio: bool = False, precomputed: bool = False) -> list[int]:
    """Load ``path`` with mlx-vlm, check templates and inputs, return 8 greedy token ids."""
    from collections import deque

    import numpy as np
    from mlx_vlm.generate import stream_generate
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import load, load_config, prepare_inputs
    from PIL import Image
    from transformers import AutoTokenizer

    model, processor = load(str(path))
    config = load_config(path)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    prompt = apply_chat_template(processor, config, "Describe this.", num_images=1)
    if precomputed:
        inputs = processor(images=[image], text=prompt)
    else:
        inputs = prepare_inputs(processor, images=[image], prompts=prompt)
    assert inputs["pixel_values"] is not None, path
    image_id = config.get("image_token_id", config.get("image_token_index"))
    assert (inputs["input_ids"] == image_id).sum().item() > 0, "image token id mismatch"
    shapes = {k: tuple(v.shape) for k, v in inputs.items() if hasattr(v, "shape")}
    print(f"  prompt={prompt!r}\n  inputs={shapes}")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye."},
    ]
    plain = AutoTokenizer.from_pretrained(str(path)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    print(f"  plain tokenizer template={plain!r}")
    kwargs = {"image": [image]}
    if precomputed:
        kwargs = {
            "input_ids": inputs["input_ids"],
            "pixel_values": inputs["pixel_values"],
            "mask": inputs["attention_mask"],
        }
    # The final result repeats the last token with finish_reason set; token_ids has them all.
    gen = stream_generate(model, processor, prompt, max_tokens=8, temperature=0, **kwargs)
    tokens = deque(gen, maxlen=1)[0].token_ids
    if audio:
        wave = (rng.standard_normal(8000) * 0.1).astype(np.float32)  # 0.5 s at 16 kHz
        prompt = apply_chat_template(processor, config, "Transcribe.", num_audios=1)
        inputs = prepare_inputs(processor, audio=[wave], prompts=prompt)
        n_audio = (inputs["input_ids"] == config["audio_token_id"]).sum().item()
        print(f"  audio prompt={prompt!r}, {n_audio} audio tokens")
        gen = stream_generate(model, processor, prompt, audio=[wave], max_tokens=8, temperature=0)
        print(f"  audio tokens={deque(gen, maxlen=1)[0].token_ids}")
    return tokens


def main(root: Path, names: list[str]) -> None:
    """Build the ``names`` families (all if empty) under ``root`` and generate from each."""
    import time

    t0 = time.perf_counter()
    import mlx_vlm.generate  # noqa: F401  (import cost out of the timings)
    import mlx_vlm.utils  # noqa: F401

    print(f"import mlx_vlm: {time.perf_counter() - t0:.2f}s")
    builders = {**FAMILIES, **PRECOMPUTED_INPUT_FAMILIES}
    for name in names or builders:
        t0 = time.perf_counter()
        path = builders[name](root / name, 0)
        t1 = time.perf_counter()
        tokens = run_family(
            path, audio=name in AUDIO_FAMILIES, precomputed=name in PRECOMPUTED_INPUT_FAMILIES
        )
        t2 = time.perf_counter()
        size = (path / "model.safetensors").stat().st_size / 1e6
        print(f"{name}: build {t1 - t0:.2f}s, load+generate {t2 - t1:.2f}s, {size:.2f} MB")
        print(f"  tokens={tokens}")


if __name__ == "__main__":
    import sys

    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny-vlms"), sys.argv[2:])

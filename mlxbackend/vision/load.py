"""Recognise vision-language checkpoints and load them with mlx-vlm into the text engine's shape.

A VLM is served by the same engine as text models: `TextModel.model` is the mlx-vlm language
model behind mlx-lm's calling convention (`vision/lm.py`), `TextModel.tokenizer` mlx-lm's
tokenizer wrapper (streaming detokenizer, tool and reasoning markers), and `TextModel.vision`
what only media requests need (the mlx-vlm model, its processor, placeholders, limits)."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxbackend.errors import InvalidInput, Unsupported

VLM_TYPES = ("vlm", "vision", "multimodal", "image-text-to-text", "mlx-vlm")
MEDIA_KINDS = ("image", "video", "audio")
# processor files that text-only checkpoints do not carry
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CONFIG_SECTIONS = ("vision_config", "audio_config", "vision_tower_config", "thinker_config")


@dataclass
class VisionParts:
    """What requests with media need, beside the text model."""

    vlm: object  # the mlx-vlm Model (vision tower, projector, language model)
    processor: object  # its processor (image / video / audio preprocessing + placeholder expansion)
    model_type: str
    placeholders: dict  # media kind → the text the chat template puts for one item
    token_ids: dict  # media kind → the id of its placeholder token after expansion
    limits: dict = field(default_factory=dict)  # media kind → max per prompt (0 = default)
    counts: dict = field(  # Status counters (vision/prefill.py)
        default_factory=lambda: {"media_prompts_encoded": 0, "media_prompts_from_cache": 0}
    )
    features: object = None  # vision/features.FeatureCache, or None (off, or family not listed)

    def status(self) -> dict:
        """Status breakdown keys: counters and the feature cache's bytes and budget."""
        f = self.features
        return {
            **self.counts,
            "vision_cache": f.nbytes if f else 0,
            "vision_cache_budget": f.max_bytes if f else 0,
            "vision_tower_runs": f.misses if f else self.counts["media_prompts_encoded"],
            "vision_cache_hits": f.hits if f else 0,
        }

    @property
    def accepts(self) -> tuple:
        return tuple(k for k in MEDIA_KINDS if self.placeholders.get(k))


def is_vision_model(path: Path, config: dict, type_hint: str = "") -> bool:
    """A VLM folder: LoadModel's Type says so, or the config has vision/audio sections, or the
    folder holds an image processor's config."""
    if type_hint.strip().lower() in VLM_TYPES:
        return True
    if any(key in config for key in CONFIG_SECTIONS):
        return True
    return path.is_dir() and any((path / name).exists() for name in PROCESSOR_FILES)


def text_config(vlm) -> dict:
    """The language model's config as a dict (for memory estimates and the engine)."""
    cfg = vlm.config.text_config
    values = dict(vars(cfg)) if not isinstance(cfg, dict) else dict(cfg)
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool, list, dict))}


def load_vision(path: Path, options: dict, limits: dict):
    """(VisionLM, tokenizer, text config, VisionParts) for a VLM folder (worker thread)."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_vlm.utils import get_model_and_args, load

    from mlxbackend.vision.features import install
    from mlxbackend.vision.lm import VisionLM

    raw = json.loads((path / "config.json").read_text())
    try:
        get_model_and_args(raw)
    except ValueError as exc:
        raise InvalidInput(f"{path.name}: mlx-vlm cannot run this model ({exc})") from None
    vlm, processor = load(str(path), trust_remote_code=bool(options.get("trust_remote_code")))
    tcfg = text_config(vlm)
    if not tcfg.get("vocab_size"):
        tcfg["vocab_size"] = int(vlm.language_model.model.embed_tokens.weight.shape[0])
    eos = getattr(vlm.config, "eos_token_id", None) or raw.get("eos_token_id")
    template = getattr(processor, "chat_template", None)  # chat_template.json / .jinja
    extra = {"chat_template": template} if isinstance(template, str) and template else None
    tokenizer = load_tokenizer(path, tokenizer_config_extra=extra, eos_token_ids=eos)
    hf = tokenizer._tokenizer
    mrope = hasattr(vlm.language_model, "_rope_deltas")
    model = VisionLM(vlm, tcfg, mrope)
    parts = VisionParts(
        vlm=vlm,
        processor=processor,
        model_type=str(raw.get("model_type", "")),
        placeholders=placeholders(hf, processor),
        token_ids=token_ids(vlm, raw, hf),
        limits=dict(limits),
        features=install(vlm, str(raw.get("model_type", "")), options),
    )
    return model, tokenizer, tcfg, parts


def refuse_unsupported(adapters: list, hot: dict, draft_model: str) -> None:
    """What the VLM path does not take yet, refused by name instead of ignored."""
    if adapters or hot:
        raise Unsupported("LoRA adapters are not supported for vision-language models yet")
    if draft_model:
        raise Unsupported("DraftModel is not supported for vision-language models yet")


def placeholders(tokenizer, processor) -> dict:
    """The text the chat template writes for one image / video / audio item: the difference
    between a user turn with and without the item (computed once per model), for the kinds the
    processor has a component for."""
    out = {}
    for kind in MEDIA_KINDS:
        if not _processes(processor, kind):
            continue
        try:
            bare = _user_turn(tokenizer, []).split("\x00")[0]
            with_item = _user_turn(tokenizer, [{"type": kind}]).split("\x00")[0]
        except Exception:  # noqa: BLE001 — a template without this media kind
            continue
        common = os.path.commonprefix([bare, with_item])
        if len(with_item) > len(common) and not bare[len(common) :].strip():
            out[kind] = with_item[len(common) :]
    return out


def _processes(processor, kind: str) -> bool:
    if kind == "image":
        return getattr(processor, "image_processor", None) is not None
    if kind == "video":
        return getattr(processor, "video_processor", None) is not None
    return any(
        getattr(processor, name, None) is not None
        for name in ("feature_extractor", "audio_processor")
    )


def _user_turn(tokenizer, parts: list) -> str:
    content = [*parts, {"type": "text", "text": "\x00"}]
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=False, tokenize=False
    )


def token_ids(vlm, config: dict, tokenizer) -> dict:
    """Ids of the tokens the processor expands each media item into."""
    cfg = vlm.config
    out = {}
    for kind in MEDIA_KINDS:
        for name in (f"{kind}_token_id", f"{kind}_token_index"):
            value = getattr(cfg, name, None) or config.get(name)
            if isinstance(value, int):
                out[kind] = value
                break
        else:
            token = getattr(tokenizer, f"{kind}_token", None)
            if isinstance(token, str) and token:
                out[kind] = tokenizer.convert_tokens_to_ids(token)
    return out

"""Resolve LocalAI's model fields to a folder and load it (with adapters and a draft model)."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mlxbackend.default_model import platform_layout
from mlxbackend.errors import InvalidInput, NotFound
from mlxbackend.text.memory import check_fits, kv_budget, largest_context
from mlxbackend.text.speculate import SpecConfig, spec_config
from mlxbackend.vision.load import is_vision_model

DEFAULT_CONTEXT = 4096


@dataclass
class LoadSpec:
    """What LoadModel asked for, as plain values."""

    model: str = ""
    model_file: str = ""
    model_path: str = ""
    context_size: int = 0
    lora_adapters: list = field(default_factory=list)  # (path, scale) pairs, raw
    draft_model: str = ""
    trust_remote_code: bool = False
    options: dict = field(default_factory=dict)
    type_hint: str = ""  # LoadModel's Type ("vlm" forces the vision-language path)
    media_limits: dict = field(default_factory=dict)  # image/video/audio → Limit*PerPrompt
    cache_type_k: str = ""  # ModelOptions CacheTypeKey / CacheTypeValue (text/kv_quant.py)
    cache_type_v: str = ""
    rope: dict = field(default_factory=dict)  # ModelOptions Rope*/Yarn*: refused when set
    grammar_triggers: list = field(default_factory=list)  # ModelOptions GrammarTriggers words


# LocalAI's mlx backend passes these Options to the tokenizer (mlx-lm's tokenizer_config).
TOKENIZER_OPTIONS = ("pad_token", "bos_token", "unk_token", "sep_token", "cls_token", "mask_token")


@dataclass
class TextModel:
    """A loaded model with everything generation needs."""

    model: object
    tokenizer: object
    config: dict
    path: Path
    context_size: int
    draft_model: object = None
    options: dict = field(default_factory=dict)
    prompt_cache: object = None  # token-prefix KV reuse across requests (text/prefix_cache.py)
    adapters: list = field(default_factory=list)  # (path, scale) fused at load
    switch: object = None  # hot-swappable LoRA adapters (text/adapters.py), or None
    adapter_names: tuple = ()
    kv_budget: int = 0  # bytes of KV that running requests may reserve (text/memory.py)
    vision: object = None  # a vision-language model's media parts (vision/load.py), or None
    kv: object = None  # the KV cache type (text/kv_quant.KvType); None = the model's float KV
    max_kv_size: int = 0  # > 0: a rotating KV cache of this many tokens (Options max_kv_size)
    warmed: object = None  # warm prompts prefilled at load (text/warm.py Warmed), or None
    ssd: object = None  # the prefix cache's SSD tier (text/ssd_cache.py Tier), or None
    grammar_triggers: tuple = ()  # ModelOptions GrammarTriggers: a Grammar with them is refused
    # speculation (text/speculate.py): on for text models (load_text_model); vision and
    # distributed models decode plainly
    spec: SpecConfig = field(default_factory=lambda: SpecConfig(lookup=False))


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def local_candidates(model: str, model_file: str = "", model_path: str = "") -> list:
    """The local paths LoadModel may name, in LocalAI's order: ModelFile, Model when absolute,
    else ModelPath/Model."""
    candidates = [Path(model_file)] if model_file else []
    if model and os.path.isabs(model):
        candidates.append(Path(model))
    elif model and model_path:
        candidates.append(Path(model_path) / model)
    return candidates


def resolve_model_path(model: str, model_file: str = "", model_path: str = "") -> Path:
    """LocalAI's order: ModelFile if it exists, Model as an absolute path, ModelPath/Model,
    then Model as a Hugging Face id (local cache first, then a download unless offline)."""
    if not (model or model_file):
        raise InvalidInput(
            "LoadModel needs Model (a path, a name under ModelPath or a HF id) or ModelFile"
        )
    tried = []
    for path in local_candidates(model, model_file, model_path):
        if path.exists():
            return path
        tried.append(str(path))
    if model and not os.path.isabs(model) and model.count("/") == 1:
        found = _from_hub(model, tried)
        if found is not None:
            return found
    raise NotFound(
        f"model {model or model_file!r} not found; tried: {', '.join(tried) or 'nothing'}"
    )


def _from_hub(repo_id: str, tried: list):
    """An mlx-lm model's files (DEFAULT_ALLOW_PATTERNS) from the hub; None if not found."""
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return hub_snapshot(repo_id, tried, DEFAULT_ALLOW_PATTERNS)


def hub_snapshot(repo_id: str, tried: list, patterns: list):
    """Find repo_id's files matching `patterns` in the local HF cache, else download them (Mac
    users); None if neither works, with what was tried appended to `tried`."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception:
        tried.append(
            f"HF cache ({os.environ.get('HF_HOME') or '~/.cache/huggingface'}) for {repo_id}"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        tried.append(f"download of {repo_id} (skipped: HF_HUB_OFFLINE is set)")
        return None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:  # network down, unknown repo, gated repo…
        tried.append(
            f"download of {repo_id} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        )
        return None


def _join(path: str, model_path: str) -> str:
    if not path or os.path.isabs(path) or not model_path:
        return path
    return str(Path(model_path) / path)


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def fix_config(config: dict) -> dict:
    """Config overrides for known traps: transformers 5 nests rope_theta (field notes §4)."""
    overrides = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" not in config and "rope_theta" in rope:
        overrides["rope_theta"] = rope["rope_theta"]
    return overrides


def _apply_adapters(model, adapters):
    """Apply LoRA/DoRA adapters at their scales and fuse them into the weights."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    for adapter_path, scale in adapters:
        if not Path(adapter_path, "adapter_config.json").exists():
            raise NotFound(f"LoRA adapter not found (no adapter_config.json): {adapter_path}")
        load_adapters(model, adapter_path)
        fused = []
        for name, module in model.named_modules():
            if hasattr(module, "fuse") and hasattr(module, "scale"):
                module.scale = module.scale * scale
                fused.append((name, module.fuse()))
        if fused:
            model.update_modules(tree_unflatten(fused))
    mx.eval(model.parameters())


def load_text_model(spec: LoadSpec) -> TextModel:
    """Load a model folder into memory; raises NotFound / InvalidInput with clear messages."""
    from mlx_lm.utils import load

    from mlxbackend.text.kv_quant import check_model, kv_type, plain_layers

    refuse_rope(spec.rope)
    kv = kv_type(spec.cache_type_k, spec.cache_type_v, spec.options)
    speculation = spec_config(spec.options)
    path = model_dir(spec.model, spec.model_file, spec.model_path)
    raw_config = read_config(path)
    max_kv_size = kv_window(spec.options, kv)
    context = spec.context_size or raw_config.get("max_position_embeddings") or DEFAULT_CONTEXT
    checked = spec.options.get("memory_check", True) is not False
    if not spec.context_size and checked and not max_kv_size:  # the most that fits, up to it
        context = largest_context(path, raw_config, int(context), kv)
    elif checked:
        check_fits(path, raw_config, min(int(context), max_kv_size or int(context)), kv)
    budget = kv_budget(path, raw_config, spec.options)  # measured before the weights arrive
    if is_vision_model(path, raw_config, spec.type_hint):
        if max_kv_size:
            raise InvalidInput(
                "Options max_kv_size is not available for vision-language models yet"
            )
        if kv.quantized:
            raise InvalidInput(
                f"a quantized KV cache ({kv.label()}) is not available for vision-language "
                "models yet: leave cache_type_k / cache_type_v unset (f16) for this one"
            )
        return _load_vision_model(spec, path, int(context), budget)
    model, tokenizer, config = load_model_dir(
        path,
        trust_remote_code=trusts_remote_code(spec),
        tokenizer_config=tokenizer_options(spec.options),
        raw_config=raw_config,
    )
    add_eos_tokens(tokenizer, spec.options)
    adapters = [(_join(p, spec.model_path), s) for p, s in spec.lora_adapters if p]
    if adapters:
        _apply_adapters(model, adapters)
    from mlxbackend.text.adapters import declared, install

    hot = declared(spec.options, spec.model_path)
    switch = install(model, hot)  # None when no `lora.<name>` option
    draft = None
    if spec.draft_model:
        draft_path = resolve_model_path(spec.draft_model, "", spec.model_path)
        if not _is_model_dir(
            draft_path
        ):  # DraftModel "/" read /config.json (FileNotFoundError → INTERNAL)
            raise InvalidInput(
                f"DraftModel {draft_path} is not an MLX/Hugging Face model folder (no config.json)"
            )
        draft, draft_tokenizer = load(
            str(draft_path), model_config=fix_config(read_config(draft_path))
        )
        if draft_tokenizer.vocab_size != tokenizer.vocab_size:
            raise InvalidInput("DraftModel must share the main model's tokenizer")
        check_model(kv, draft, read_config(draft_path))
        if plain_layers(draft) != {"KVCache"}:
            raise InvalidInput(
                f"DraftModel {draft_path} lays out its own caches (sliding-window or recurrent "
                "layers), which speculative batches cannot rewind; use a plain transformer draft"
            )
    check_model(kv, model, config)
    if max_kv_size and plain_layers(model) != {"KVCache"}:
        raise InvalidInput(
            "Options max_kv_size: this model lays out its own caches (sliding-window or "
            "recurrent layers), which a rotating KV cache would replace; leave it unset"
        )
    return TextModel(
        model,
        tokenizer,
        config,
        path,
        int(context),
        draft,
        dict(spec.options),
        adapters=adapters,
        switch=switch,
        adapter_names=tuple(hot),
        kv_budget=budget,
        kv=kv,
        max_kv_size=max_kv_size,
        grammar_triggers=tuple(w for w in spec.grammar_triggers if w),
        spec=speculation,
    )


def refuse_rope(rope: dict) -> None:
    """ModelOptions RoPE overrides (llama.cpp's rope_freq_base / rope_freq_scale / rope_scaling /
    yarn_*) would change every logit; MLX models take RoPE from config.json, so a set one is
    refused, naming it, instead of being silently ignored (0 / "" = unset, what LocalAI sends)."""
    bad = {k: v for k, v in rope.items() if v not in (0, 0.0, "", "none")}
    if bad:
        raise InvalidInput(
            f"{', '.join(f'{k}={v!r}' for k, v in bad.items())}: RoPE overrides are not applied "
            "by this backend; set rope_theta / rope_scaling in the model's config.json instead "
            '(README "Request fields")'
        )


def _load_vision_model(spec: LoadSpec, path: Path, context: int, budget: int) -> TextModel:
    """A vision-language checkpoint through mlx-vlm (vision/load.py), served by the same engine."""
    from mlxbackend.text.adapters import declared
    from mlxbackend.vision.load import load_vision, refuse_unsupported

    refuse_unsupported(
        spec.lora_adapters, declared(spec.options, spec.model_path), spec.draft_model
    )
    model, tokenizer, config, parts = load_vision(path, spec.options, spec.media_limits)
    if not spec.context_size:
        context = int(config.get("max_position_embeddings") or context)
    return TextModel(
        model, tokenizer, config, path, context, options=dict(spec.options), kv_budget=budget,
        vision=parts,
    )  # fmt: skip


def kv_window(options: dict, kv) -> int:
    """Options max_kv_size (LocalAI's MLX backends' key): a rotating KV cache of that many
    tokens (mlx-lm's RotatingKVCache, keeping the first 4); 0 = none."""
    size = options.get("max_kv_size", 0)
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidInput(f"Options max_kv_size must be an integer >= 0, got {size!r}")
    if size and size < 16:
        raise InvalidInput(f"Options max_kv_size {size} is too small (at least 16 tokens)")
    if size and kv.quantized:
        raise InvalidInput(
            "Options max_kv_size (a rotating KV cache) cannot be combined with a quantized KV "
            "cache yet: choose one"
        )
    return size


def model_dir(model: str, model_file: str = "", model_path: str = "") -> Path:
    """The MLX model folder for LocalAI's model fields (a .gguf file is imported once)."""
    path = resolve_model_path(model, model_file, model_path)
    if path.is_file() and path.suffix == ".gguf":
        path = _gguf_to_mlx_cache(path, model_path)
    if not _is_model_dir(path):
        raise InvalidInput(f"{path} is not an MLX/Hugging Face model folder (no config.json)")
    return path


def trusts_remote_code(spec: LoadSpec) -> bool:
    """TrustRemoteCode, or Options trust_remote_code (LocalAI's mlx backends read both)."""
    return spec.trust_remote_code or bool(spec.options.get("trust_remote_code"))


def tokenizer_options(options: dict) -> dict:
    """The Options LocalAI's mlx backend hands its tokenizer (mlx-lm's tokenizer_config)."""
    return {k: str(options[k]) for k in TOKENIZER_OPTIONS if k in options}


def trusted(tokenizer_config: dict | None, trust_remote_code: bool) -> dict:
    """mlx-lm's tokenizer_config, with trust_remote_code when given (mlx-lm's load passes it to
    the model only)."""
    tokenizer_config = dict(tokenizer_config or {})
    if trust_remote_code:
        tokenizer_config["trust_remote_code"] = True
    return tokenizer_config


def add_eos_tokens(tokenizer, options: dict) -> None:
    """Options eos_token: extra end-of-sequence tokens, comma-separated."""
    for token in str(options.get("eos_token", "")).split(","):
        if token.strip():
            try:
                tokenizer.add_eos_token(token.strip())
            except ValueError as exc:
                raise InvalidInput(f"option eos_token: {exc}") from None


def remote_code_refused(path: Path, exc: ValueError) -> InvalidInput | None:
    """The error for a folder that ships its own code, loaded without trust_remote_code."""
    if "trust_remote_code" not in str(exc):
        return None
    return InvalidInput(
        f"{path.name} ships its own code (tokenizer or model); load it with TrustRemoteCode "
        "or Options trust_remote_code:true if you trust it"
    )


def load_model_dir(
    path: Path,
    trust_remote_code: bool = False,
    tokenizer_config: dict | None = None,
    raw_config: dict | None = None,
):
    """mlx-lm's load with our config fixes: (model, tokenizer, config). `trust_remote_code`
    reaches the tokenizer too (mlx-lm's load passes it to the model only); a folder that ships
    its own code without it is InvalidInput."""
    from mlx_lm.utils import load

    try:
        return load(
            str(path),
            tokenizer_config=trusted(tokenizer_config, trust_remote_code),
            model_config=fix_config(read_config(path) if raw_config is None else raw_config),
            return_config=True,
            trust_remote_code=trust_remote_code,
        )
    except ValueError as exc:
        if (refused := remote_code_refused(path, exc)) is None:
            raise
        raise refused from None


def _gguf_to_mlx_cache(gguf_path: Path, model_path: str) -> Path:
    """Import a GGUF once into an MLX folder cached beside the models."""
    from converters.gguf_to_mlx import convert_gguf

    root = Path(model_path) if model_path else gguf_path.parent
    out = root / ".mlx-cache" / gguf_path.stem
    if not _is_model_dir(out):
        dtype, dequantize = platform_layout(None)  # float32 on CPU Linux, native on a Mac
        convert_gguf(gguf_path, out, dtype=dtype, dequantize=dequantize, overwrite=out.exists())
    return out

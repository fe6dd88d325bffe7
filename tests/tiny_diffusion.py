"""Tiny RANDOM DiffusionKit folders (SD3 and FLUX) in the real argmaxinc layout.

Each model is built with DiffusionKit's own MLX classes at a tiny size and random init; its
parameters are then renamed and reshaped BACK to the key layout of the real checkpoints
(SD3: `model.diffusion_model.joint_blocks.N.x_block.attn.qkv.weight`, `first_stage_model.decoder.…`;
FLUX: BFL's `double_blocks.N.img_attn.qkv.weight`, `single_blocks.N.linear1.weight`, `ae.safetensors`
`decoder.up.N.block.M.conv1.weight`; CLIP: HF `text_model.encoder.layers.N.self_attn.q_proj.weight`;
T5: HF `encoder.block.N.layer.0.SelfAttention.q.weight`). Every inversion is checked by running
DiffusionKit's forward state-dict adjustment on the result and comparing with the module's own
parameters, so loading these folders exercises the real loading path. diffusionkit.json carries
the tiny configs. The CLIP BPE vocabulary (byte symbols + a few merges) and the T5 tokenizers (a
`tokenizers` Unigram tokenizer.json for FLUX, a trained sentencepiece spiece.model for SD3) are
built locally."""

import json
import re
from pathlib import Path

CLIP_L = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    projection_dim=32,
    hidden_act="quick_gelu",
)
CLIP_G = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=2, projection_dim=32, hidden_act="gelu"
)
T5 = dict(
    d_kv=16,
    num_heads=4,
    d_ff=128,
    num_layers=2,
    vocab_size=160,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
)
VAE_DECODER = dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, resnet_groups=8)
VAE_ENCODER = dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, resnet_groups=8)
SD3_MMDIT = dict(
    depth_multimodal=2,
    num_heads=2,
    hidden_size_override=64,
    max_latent_resolution=16,
    pooled_text_embed_dim=64,
    token_level_text_embed_dim=96,
)
FLUX_MMDIT = dict(
    depth_multimodal=1,
    depth_unified=1,
    num_heads=2,
    hidden_size_override=64,
    rope_axes_dim=[8, 12, 12],
    pooled_text_embed_dim=32,
    token_level_text_embed_dim=64,
)
WORDS = [
    "a",
    "photo",
    "of",
    "the",
    "red",
    "cube",
    "cat",
    "dog",
    "on",
    "table",
    "blurry",
    "green",
    "blue",
    "sky",
]


def diffusionkit_sample(pipe, plan, cond, pooled, cfg: float):
    """DiffusionKit's own sample_euler + CFGDenoiser on a loaded pipeline (the reference our loop
    is tested and benchmarked against): (final latent, seconds of the loop, evaluated)."""
    import time
    from types import SimpleNamespace

    import mlx.core as mx

    from mlxbackend.image.generate import initial_latent, sampler_for, sigmas_for

    dk = _dk()
    sampler = sampler_for(pipe, plan.shift)
    sigmas = sigmas_for(sampler, plan.steps, pipe.family == "flux")
    x = initial_latent(pipe, plan, sigmas[0], sampler)
    host = SimpleNamespace(
        mmdit=pipe.mmdit,
        activation_dtype=pipe.dtype,
        sampler=sampler,
        load_mmdit=lambda only_modulation_dict=True: pipe.modulation,
    )
    start = time.perf_counter()
    latent, _ = dk.sample_euler(
        dk.CFGDenoiser(host),
        x,
        sigmas,
        extra_args={"conditioning": cond, "cfg_weight": cfg, "pooled_conditioning": pooled},
    )
    mx.eval(latent)
    seconds = time.perf_counter() - start
    pipe.mmdit.clear_modulation_params_cache()  # back to the loaded state (DiffusionKit leaves these)
    pipe.mmdit.pop("to_offload", None)
    return latent, seconds


def _dk():
    from mlxbackend.image.compat import import_diffusionkit

    return import_diffusionkit()


def _params(module) -> dict:
    from mlx.utils import tree_flatten

    return dict(tree_flatten(module.parameters()))


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _check(adjusted: dict, params: dict, what: str):
    """DiffusionKit's forward adjustment of the written keys must give back the module's parameters."""
    import mlx.core as mx

    assert set(adjusted) == set(params), f"{what}: {sorted(set(adjusted) ^ set(params))[:8]}"
    for k, v in params.items():
        assert adjusted[k].shape == v.shape and mx.array_equal(adjusted[k], v).item(), (
            f"{what}: {k}"
        )


def _merge_qkv(params: dict, out: dict, rules):
    """Multimodal blocks' attn.{q,k,v}_proj → one fused qkv tensor (weights and biases), renamed."""
    import mlx.core as mx

    for key in [
        k for k in params if k.startswith("multimodal_transformer_blocks") and ".attn.q_proj." in k
    ]:
        parts = [params.pop(key.replace("q_proj", n)) for n in ("q_proj", "k_proj", "v_proj")]
        out[_rename(key.replace("attn.q_proj", "attn.qkv"), rules)] = mx.concatenate(parts, axis=0)


# -- MMDiT ----------------------------------------------------------------------------------------
SD3_RULES = [
    (r"^multimodal_transformer_blocks\.", "joint_blocks."),
    (r"text_transformer_block", "context_block"),
    (r"image_transformer_block", "x_block"),
    (r"adaLN_modulation\.layers\.", "adaLN_modulation."),
    (r"_embedder\.mlp\.layers\.", "_embedder.mlp."),
    (r"\.qk_norm\.q_norm\.", ".attn.ln_q."),
    (r"\.qk_norm\.k_norm\.", ".attn.ln_k."),
    (r"attn\.o_proj", "attn.proj"),
]


def sd3_checkpoint(model) -> dict:
    """An SD3 MMDiT's parameters in sd3_medium.safetensors' layout (without the VAE)."""
    import mlx.core as mx

    params = _params(model)
    out = {}
    for key in [
        k for k in params if k.endswith("attn.q_proj.bias")
    ]:  # DiffusionKit drops the key bias
        params[key.replace("q_proj", "k_proj")] = mx.random.normal(params[key].shape) * 0.02
    _merge_qkv(params, out, SD3_RULES)
    for key, value in params.items():
        if key == "x_embedder.proj.weight":
            value = value.transpose(0, 3, 1, 2)
        if key == "x_pos_embedder.pos_embed.weight":
            key, value = "pos_embed", value[None]
        out[_rename(key, SD3_RULES)] = value
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


FLUX_RULES = [
    (r"^multimodal_transformer_blocks\.(\d+)\.image_transformer_block\.", r"double_blocks.\1.img_"),
    (r"^multimodal_transformer_blocks\.(\d+)\.text_transformer_block\.", r"double_blocks.\1.txt_"),
    (r"^unified_transformer_blocks\.(\d+)\.transformer_block\.", r"single_blocks.\1."),
    (r"_qk_norm\.(q|k)_norm\.weight$", r"_attn.norm.\1_norm.scale"),
    (r"^(single_blocks\.\d+)\.qk_norm\.(q|k)_norm\.weight$", r"\1.norm.\2_norm.scale"),
    (r"norm\.q_norm", "norm.query_norm"),
    (r"norm\.k_norm", "norm.key_norm"),
    (r"_mlp\.fc1", "_mlp.0"),
    (r"_mlp\.fc2", "_mlp.2"),
    (r"attn\.o_proj", "attn.proj"),
    (r"_adaLN_modulation\.layers\.1", "_mod.lin"),
    (r"^(single_blocks\.\d+)\.adaLN_modulation\.layers\.1", r"\1.modulation.lin"),
    (r"^x_embedder\.proj\.", "img_in."),
    (r"^context_embedder\.", "txt_in."),
    (r"^t_embedder\.", "time_in."),
    (r"^y_embedder\.", "vector_in."),
    (r"\.mlp\.layers\.0\.", ".in_layer."),
    (r"\.mlp\.layers\.2\.", ".out_layer."),
    (r"^final_layer\.adaLN_modulation\.layers\.1", "final_layer.adaLN_modulation.1"),
]


def flux_checkpoint(model, guidance_in=None) -> dict:
    """A FLUX MMDiT's parameters in BFL's layout (flux-schnell.safetensors / flux1-dev.safetensors)."""
    import mlx.core as mx

    params = _params(model)
    if guidance_in is not None:
        params.update({f"guidance_in.{k}": v for k, v in _params(guidance_in).items()})
    out = {}
    _merge_qkv(params, out, FLUX_RULES)
    for key in [
        k for k in params if k.startswith("unified_transformer_blocks") and ".attn.q_proj." in k
    ]:
        block, kind = key.split(".attn.")[0], key.rsplit(".", 1)[1]
        single = block.replace("unified_transformer_blocks", "single_blocks").replace(
            ".transformer_block", ""
        )
        # linear1 = q, k, v and the MLP's fc1 stacked; linear2 = o_proj and fc2 side by side
        parts = [params.pop(f"{block}.attn.{n}_proj.{kind}") for n in "qkv"]
        out[f"{single}.linear1.{kind}"] = mx.concatenate(
            [*parts, params.pop(f"{block}.mlp.fc1.{kind}")], axis=0
        )
        o_proj, fc2 = (
            params.pop(f"{block}.attn.o_proj.{kind}"),
            params.pop(f"{block}.mlp.fc2.{kind}"),
        )
        # linear2's bias serves both o_proj and fc2 (DiffusionKit zeroes fc2's at run time)
        out[f"{single}.linear2.{kind}"] = (
            mx.concatenate([o_proj, fc2], axis=1) if kind == "weight" else o_proj
        )
    for key, value in params.items():
        if key == "x_embedder.proj.weight":
            value = value[:, 0, 0, :]
        out[_rename(key, FLUX_RULES)] = value
    return out


# -- VAE ------------------------------------------------------------------------------------------
VAE_RULES = [
    (r"^(up|down)_blocks\.(\d+)\.resnets\.", r"\1.\2.block."),
    (r"^(up|down)_blocks\.(\d+)\.(upsample|downsample)\.", r"\1.\2.\3.conv."),
    (r"^mid_blocks\.0\.", "mid.block_1."),
    (r"^mid_blocks\.1\.", "mid.attn_1."),
    (r"^mid_blocks\.2\.", "mid.block_2."),
    (r"\.group_norm\.", ".norm."),
    (r"\.query_proj\.", ".q."),
    (r"\.key_proj\.", ".k."),
    (r"\.value_proj\.", ".v."),
    (r"\.out_proj\.", ".proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"^conv_norm_out\.", "norm_out."),
]


def vae_checkpoint(model, prefix: str) -> dict:
    """A VAE decoder/encoder in the LDM layout (torch conv shapes) under `prefix`."""
    out = {}
    for key, value in _params(model).items():
        if value.ndim == 4:
            value = value.transpose(0, 3, 1, 2)
        elif value.ndim == 2:  # 1×1 convs: attention projections and shortcuts
            value = value[:, :, None, None]
        out[prefix + _rename(key, VAE_RULES)] = value
    return out


# -- text encoders --------------------------------------------------------------------------------
CLIP_RULES = [
    (r"^(token|position)_embedding\.", r"text_model.embeddings.\1_embedding."),
    (r"^layers\.", "text_model.encoder.layers."),
    (r"^final_layer_norm\.", "text_model.final_layer_norm."),
    (r"\.attention\.query_proj\.", ".self_attn.q_proj."),
    (r"\.attention\.key_proj\.", ".self_attn.k_proj."),
    (r"\.attention\.value_proj\.", ".self_attn.v_proj."),
    (r"\.attention\.out_proj\.", ".self_attn.out_proj."),
    (r"\.linear1\.", ".mlp.fc1."),
    (r"\.linear2\.", ".mlp.fc2."),
]
T5_RULES = [
    (
        r"^encoder\.layers\.(\d+)\.attention\.query_proj\.",
        r"encoder.block.\1.layer.0.SelfAttention.q.",
    ),
    (
        r"^encoder\.layers\.(\d+)\.attention\.key_proj\.",
        r"encoder.block.\1.layer.0.SelfAttention.k.",
    ),
    (
        r"^encoder\.layers\.(\d+)\.attention\.value_proj\.",
        r"encoder.block.\1.layer.0.SelfAttention.v.",
    ),
    (
        r"^encoder\.layers\.(\d+)\.attention\.out_proj\.",
        r"encoder.block.\1.layer.0.SelfAttention.o.",
    ),
    (r"^encoder\.layers\.(\d+)\.ln1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.ln2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^encoder\.layers\.(\d+)\.dense\.", r"encoder.block.\1.layer.1.DenseReluDense."),
    (
        r"^encoder\.relative_attention_bias\.embeddings\.",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.",
    ),
    (r"^encoder\.ln\.", "encoder.final_layer_norm."),
]


def _bytes_symbols() -> list:
    from mlxbackend.image.pipeline import _bytes_to_unicode

    return list(_bytes_to_unicode().values())


def write_clip_tokenizer(folder: Path):
    """A CLIP BPE vocabulary: the 256 byte symbols, their </w> forms, merges spelling WORDS, specials last."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_symbols()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    merges = list(dict.fromkeys(merges))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n"
    )
    return len(vocab)


def write_clip(folder: Path, spec: dict, vocab_size: int):
    import mlx.core as mx

    dk = _dk()
    from diffusionkit.mlx.clip import CLIPTextModel
    from diffusionkit.mlx.config import CLIPTextModelConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "max_position_embeddings": 77,
        "intermediate_size": 4 * spec["hidden_size"],
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "layer_norm_eps": 1e-5,
        **spec,
    }
    model = CLIPTextModel(
        CLIPTextModelConfig(
            num_layers=spec["num_hidden_layers"],
            model_dims=spec["hidden_size"],
            num_heads=spec["num_attention_heads"],
            max_length=77,
            vocab_size=vocab_size,
            projection_dim=spec["projection_dim"],
            hidden_act=spec["hidden_act"],
        )
    )
    params = _params(model)
    weights = {_rename(k, CLIP_RULES): v for k, v in params.items()}
    weights = {k: v.astype(mx.float16) for k, v in weights.items()}
    mapped = dict(
        x for k, v in weights.items() for x in dk.model_io.map_clip_text_encoder_weights(k, v)
    )
    _check(mapped, {k: v.astype(mx.float16) for k, v in params.items()}, "clip")
    mx.save_safetensors(str(folder / "model.fp16.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_t5(folder: Path, d_model: int, tokenizer: str):
    """t5/config.json + t5xxl.safetensors (HF T5EncoderModel layout) + a tokenizer: "json" writes a
    `tokenizers` Unigram tokenizer.json, "spiece" trains a sentencepiece spiece.model."""
    from types import SimpleNamespace

    import mlx.core as mx

    dk = _dk()
    from diffusionkit.mlx.t5 import SD3T5Encoder

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": d_model,
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 0,
        **T5,
    }
    model = SD3T5Encoder(SimpleNamespace(**config), low_memory_mode=False)
    params = _params(model)
    weights = {_rename(k, T5_RULES): v for k, v in params.items() if k != "wte.weight"}
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"] = params["wte.weight"]
    _check(dk.model_io.t5_encoder_state_dict_adjustments(dict(weights)), params, "t5")
    mx.save_safetensors(str(folder / "t5xxl.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer == "json":
        write_t5_tokenizer_json(folder, T5["vocab_size"])
    else:
        write_t5_spiece(folder, T5["vocab_size"])


def write_t5_tokenizer_json(folder: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,.!?'0123456789"]
    assert len(pieces) <= vocab_size
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 512,
                "extra_ids": 0,
                "legacy": False,
            }
        )
    )


def write_t5_spiece(folder: Path, vocab_size: int):
    import io

    import sentencepiece

    text = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buffer,
        vocab_size=min(vocab_size, 80),
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "T5Tokenizer",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "model_max_length": 512,
                "extra_ids": 0,
                "legacy": False,
            }
        )
    )


# -- folders --------------------------------------------------------------------------------------
def _vae(config_cls, spec):
    from dataclasses import replace

    config = replace(config_cls(), **spec)
    return dict(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=list(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        resnet_groups=config.resnet_groups,
    )


def _write_vae(weights: dict, prefix: str):
    dk = _dk()
    from diffusionkit.mlx import config as dkc
    from diffusionkit.mlx.vae import VAEDecoder, VAEEncoder

    decoder = VAEDecoder(**_vae(dkc.VAEDecoderConfig, VAE_DECODER))
    encoder = VAEEncoder(**_vae(dkc.VAEEncoderConfig, VAE_ENCODER))
    weights.update(vae_checkpoint(decoder, f"{prefix}decoder."))
    weights.update(vae_checkpoint(encoder, f"{prefix}encoder."))
    io, dec, enc = dk.model_io, f"{prefix}decoder.", f"{prefix}encoder."
    _check(
        io.vae_decoder_state_dict_adjustments(dict(weights), prefix=dec),
        _params(decoder),
        "decoder",
    )
    _check(
        io.vae_encoder_state_dict_adjustments(dict(weights), prefix=enc),
        _params(encoder),
        "encoder",
    )
    return weights


def _mmdit(base, overrides):
    from dataclasses import replace

    import mlx.core as mx
    from diffusionkit.mlx import config as dkc
    from diffusionkit.mlx.mmdit import MMDiT

    overrides = dict(overrides)
    if "rope_axes_dim" in overrides:
        overrides["rope_axes_dim"] = tuple(overrides["rope_axes_dim"])
    return MMDiT(replace(getattr(dkc, base), **overrides, low_memory_mode=False, dtype=mx.float32))


def build_tiny_sd3(out_dir, t5: bool = False, seed: int = 0, mmdit: dict | None = None) -> Path:
    """SD3-medium layout: sd3_medium.safetensors (MMDiT + VAE), clip_l, clip_g, tokenizers,
    and with t5=True a tiny t5/ (sentencepiece tokenizer, like google/t5-v1_1-xxl's spiece.model).
    mmdit overrides SD3_MMDIT (the benchmark builds a deeper, wider one)."""
    import mlx.core as mx

    dk = _dk()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    mmdit = {**SD3_MMDIT, **(mmdit or {})}
    model = _mmdit("SD3_2b", mmdit)
    weights = sd3_checkpoint(model)
    adjusted = dk.model_io.mmdit_state_dict_adjustments(
        dict(weights), prefix="model.diffusion_model."
    )
    _check(adjusted, _params(model), "sd3 mmdit")
    weights = _write_vae(weights, "first_stage_model.")
    mx.save_safetensors(str(out / "sd3_medium.safetensors"), weights)
    size = write_clip_tokenizer(out / "tokenizer_l")
    write_clip_tokenizer(out / "tokenizer_g")
    write_clip(out / "clip_l", CLIP_L, size)
    write_clip(out / "clip_g", CLIP_G, size)
    if t5:
        write_t5(out / "t5", mmdit["token_level_text_embed_dim"], "spiece")
    manifest = {
        "family": "sd3",
        "mmdit": mmdit,
        "vae_decoder": VAE_DECODER,
        "vae_encoder": VAE_ENCODER,
        "t5_max_length": 16,
        "default_steps": 2,
        "default_cfg": 5.0,
        "shift": 3.0,
        "default_size": 64,
    }
    (out / "diffusionkit.json").write_text(json.dumps(manifest, indent=2))
    return out


def build_tiny_flux(out_dir, dev: bool = False, seed: int = 0) -> Path:
    """FLUX layout: flux-schnell.safetensors (or flux1-dev.safetensors with a guidance embedder),
    ae.safetensors, clip_l, tokenizer_l and t5/ (tokenizers tokenizer.json)."""
    import mlx.core as mx

    dk = _dk()
    from diffusionkit.mlx.mmdit import MLPEmbedder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = _mmdit("FLUX_SCHNELL", FLUX_MMDIT)
    for block in model.multimodal_transformer_blocks:  # BFL's qkv carries a key bias
        for side in (block.image_transformer_block, block.text_transformer_block):
            side.attn.k_proj.bias = mx.random.normal((64,)) * 0.02
    for block in model.unified_transformer_blocks:
        block.transformer_block.attn.k_proj.bias = mx.random.normal((64,)) * 0.02
        block.transformer_block.mlp.fc2.bias = block.transformer_block.attn.o_proj.bias
    guidance = MLPEmbedder(model.config.frequency_embed_dim, 64) if dev else None
    weights = flux_checkpoint(model, guidance)
    expected = _params(model)
    if guidance is not None:
        expected.update({f"guidance_in.{k}": v for k, v in _params(guidance).items()})
    adjusted = dk.model_io.flux_state_dict_adjustments(
        dict(weights), hidden_size=64, mlp_ratio=model.config.mlp_ratio
    )
    _check(adjusted, expected, "flux mmdit")
    name = "flux1-dev.safetensors" if dev else "flux-schnell.safetensors"
    mx.save_safetensors(str(out / name), weights)
    mx.save_safetensors(str(out / "ae.safetensors"), _write_vae({}, ""))
    size = write_clip_tokenizer(out / "tokenizer_l")
    write_clip(out / "clip_l", CLIP_L, size)
    write_t5(out / "t5", FLUX_MMDIT["token_level_text_embed_dim"], "json")
    manifest = {
        "family": "flux",
        "mmdit": FLUX_MMDIT,
        "vae_decoder": VAE_DECODER,
        "vae_encoder": VAE_ENCODER,
        "t5_max_length": 16,
        "default_steps": 2,
        "shift": 1.0,
        "default_size": 64,
        "max_size": 256,
    }
    if dev:
        manifest["default_cfg"] = 3.5
    (out / "diffusionkit.json").write_text(json.dumps(manifest, indent=2))
    return out

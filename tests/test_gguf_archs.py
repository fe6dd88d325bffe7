"""GGUF import of more architectures: tiny random Hugging Face models, converted by llama.cpp.

Per architecture: a tiny random model is built with transformers (float32, CPU) and saved in
Hugging Face layout; llama.cpp's own ``convert_hf_to_gguf.py`` (through
``converters.mlx_to_gguf``) writes F16 and Q8_0 GGUFs; ``convert_gguf`` imports them and
``mlx_lm.load`` opens the folder. Checked: logits against transformers (float32) and against
llama.cpp (llama-cpp-python) on the same token ids, greedy decoding against llama.cpp on the
same GGUF token for token, and the rebuilt tokenizer against llama.cpp's on a few texts.
Each run prints the measured figures as one JSON line (``pytest -s``). Later cases (DeepSeek
MLA, gpt-oss with MXFP4 experts from llama.cpp's quantizer) skip Q4_0 and check their quantized
mixture-of-experts logits per position (see ROUTER_FLIPS). gpt-oss is also saved as an MXFP4
checkpoint in OpenAI's layout (``write_mxfp4_checkpoint``), which llama.cpp's converter writes
through; DeepSeek-V2's group-limited routing is compared with transformers where llama.cpp
ranks the groups differently (see GROUP_RULE).

Tokenizers: the tiny byte-level BPE of ``tests.tiny_model`` (llama.cpp's converter cannot
identify a custom vocabulary, so it is labelled ``gpt-2``, whose pre-tokenizer it uses), or,
where the converter reads only ``tokenizer.model`` (Gemma 1/2, Mistral here), a tiny
SentencePiece BPE model trained on the same corpus.
"""

import io
import json
import time

import llama_cpp
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from transformers import PreTrainedTokenizerFast

from converters.gguf_to_mlx import ARCHITECTURES, convert_gguf, read_gguf
from converters.mlx_to_gguf import _quantize, mlx_to_gguf
from tests import tiny_model as tm
from tests.test_mlx_to_gguf import PRE, llama_greedy

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS, PAD = "<|im_end|>", "<|endoftext|>"
PROMPT = "The capital of France is Paris. The weather in Paris is"
GREEDY_TOKENS = 12
TEXTS = [
    " Once upon a time,  in 1889 the Eiffel Tower was 330 metres tall.",
    "Café crème, naïve élève: 🐉 ß ∑ 日本",
    "<|im_start|>user\nHello!<|im_end|>\n<start_of_turn>model\n\tx = 12345",
]
# Per GGUF type: max |logit difference| / max |logit| against transformers (float32) and
# against llama.cpp on the same GGUF, and the least share of the prompt's positions whose top-1
# token equals llama.cpp's. F16 stays within ~0.3% (~0.65% with LongRoPE, whose attention factor,
# 1.58 here, amplifies the rounding; llama.cpp is as far off). Q8_0 rounds every weight, which
# moves these random, high-variance tiny models' logits by up to ~6% of their range, in
# llama.cpp as much as in MLX. Q4_0 (llama.cpp's quantizer) moves them by up to ~85% from
# transformers (not checked), but MLX stays within ~6% of llama.cpp, which rounds the
# activations to 8 bits for its Q4_0 dot products where MLX keeps them in float: near-tied top
# tokens can swap, so greedy text is compared token for token for F16 and Q8_0 only.
# MXFP4 (gpt-oss experts; Q8_0 elsewhere): 4-bit E2M1 moves these random models' logits by
# 10-55% from transformers (llama.cpp as much: not checked); MLX stays within ~4% of llama.cpp
# (which rounds the activations to 8 bits for its MXFP4 dot products) outside router flips.
TOLERANCE = {
    "f16": (1e-2, 5e-3, 1.0),
    "q8_0": (8e-2, 5e-2, 0.8),
    "q4_0": (None, 8e-2, 0.8),
    "mxfp4_moe": (None, 5e-2, 0.8),
    # An MXFP4 checkpoint (F16 elsewhere): the experts are the checkpoint's values exactly, so
    # MLX is as close to the checkpoint's dequantized transformers model as for F16.
    "mxfp4": (1e-2, 5e-2, 0.8),
}
# Greedy text must equal llama.cpp's token for token for these types (see above for Q4_0;
# MXFP4 likewise rounds llama.cpp's activations).
GREEDY_EXACT = {"f16", "q8_0"}
# Mixture of experts, quantized: where two experts' router scores nearly tie, the rounding (in
# MLX, in llama.cpp, against float32 transformers) picks a different expert for a token, which
# moves that token's logits by up to ~15% (Q8_0) / ~40% (Q4_0) of the range in these models.
MOE_TOLERANCE = {"q8_0": (0.25, 0.25, 0.8), "q4_0": (None, 0.5, 0.8)}

# Shared small dimensions: hidden 64 (sqrt(64) = 8 is exact, Gemma scales embeddings by it),
# 4 query heads of 16 over 2 KV heads; a larger init makes the logits peaked (clear argmax).
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 1024,
    "initializer_range": 0.2,
    "tie_word_embeddings": False,
}
# DeepSeek multi-head latent attention: 4 heads of 32 (no rope) + 16 (rope) dims for q/k and 32
# for v, a 32-dim KV latent; 4 experts (top 2) of 32 plus one shared; YaRN x4 from 16 tokens.
_MLA = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 4,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "rope_parameters": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
}
# GGUF arch -> (transformers config class, model class, config overrides).
MODELS = {
    # Gemma 1/2: llama.cpp's converter drops lm_head (the real models tie it to the embedding).
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"tie_word_embeddings": True}),
    # mlx-lm's gemma2 has no sliding window: a window longer than the prompt keeps the models
    # equal (llama.cpp and transformers use it on every other layer).
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"tie_word_embeddings": True, "sliding_window": 64, "query_pre_attn_scalar": 16},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        # 6 layers: every 6th is global (llama.cpp's and mlx-lm's default pattern); a window of
        # 4 tokens, shorter than the prompt, so the sliding-window masks are exercised.
        {"num_hidden_layers": 6, "sliding_window": 4, "query_pre_attn_scalar": 16},
    ),
    # Half the head dims rotated (Phi-4-mini rotates 3/4). The converter writes a byte-level BPE
    # vocabulary only for tokenizer_class GPT2Tokenizer (Phi-4), else it wants tokenizer.model.
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"partial_rotary_factor": 0.5}),
    # LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini): mlx-lm always applies the long factors,
    # llama.cpp when its context (256) exceeds the original one, transformers when the sequence
    # does: an original context of 16 tokens, shorter than the prompt, makes all three agree.
    "phi3-longrope": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 16,
            "rope_scaling": {
                "rope_type": "longrope",
                "long_factor": [1.0, 1.5, 3.0, 8.0],
                "short_factor": [1.0, 1.1, 1.2, 1.5],
                "original_max_position_embeddings": 16,
            },
        },
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {
            "embedding_multiplier": 3.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 0.1,
            "logits_scaling": 4.0,
            "attention_bias": True,
        },
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {}),
    # Qwen3-MoE checkpoints renormalise the top-k router weights (llama.cpp always does).
    "qwen3moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
        },
    ),  # fmt: skip
    "qwen2moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 48,
        },
    ),
    # Mistral GGUFs are "llama"; this one has a SentencePiece vocabulary with a dummy prefix.
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    # DeepSeek-V2-Lite style: no q LoRA (plain attn_q), softmax router, shared expert, leading
    # dense layers, routed scaling, YaRN (mscale 0.707 as in V2). llama.cpp reads a q-LoRA-less
    # GGUF only at V2-Lite's depth (26/27 layers), hence 26 layers: 24 dense + 2 MoE, with a
    # smaller init (0.2 makes 26 random layers chaotic: F16 rounding alone then moves the
    # logits by 2-3%, in llama.cpp as much as in MLX).
    "deepseek2-lite": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            **_MLA,
            "num_hidden_layers": 26,
            "first_k_dense_replace": 24,
            "initializer_range": 0.1,
            "q_lora_rank": None,
            "routed_scaling_factor": 1.5,
        },
    ),
    # DeepSeek-V3 style: q LoRA (attn_q_a/q_a_norm/q_b), sigmoid router with a selection bias
    # (exp_probs_b), 8 experts in 4 groups (top-2 groups), renormalised top-k, scale 2.5.
    "deepseek2-v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        {
            **_MLA,
            "q_lora_rank": 32,
            "n_routed_experts": 8,
            "n_group": 4,
            "topk_group": 2,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "scoring_func": "sigmoid",  # what V3's config.json says (llama.cpp's converter reads it)
            "topk_method": "noaux_tc",
        },
    ),
    # DeepSeek-V2 / V2.5 style: q LoRA, softmax router limited to the experts of the best 3 of 8
    # groups (group_limited_greedy: groups ranked by their best expert), 6 experts of 32 (V2: of
    # 160, 4 per group here), no renormalisation, scale 16. The groups change the experts chosen
    # only when more experts than groups are used (the best expert's group always wins).
    "deepseek2-v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            **_MLA,
            "q_lora_rank": 32,
            "n_routed_experts": 32,
            "num_experts_per_tok": 6,
            "n_group": 8,
            "topk_group": 3,
            "topk_method": "group_limited_greedy",
            "routed_scaling_factor": 16.0,
            "scoring_func": "softmax",  # as in V2's config.json (llama.cpp's converter reads it)
        },
    ),
    # gpt-oss: attention sinks, biases, a 4-token window on every other layer (the first
    # sliding, llama.cpp's default), clamped SwiGLU, YaRN as in gpt-oss's config (truncate false,
    # which llama.cpp and mlx-lm ignore: equal here). MXFP4: llama.cpp's quantizer (MXFP4_MOE:
    # MXFP4 experts, Q8_0 elsewhere), and ("mxfp4") the converter from an MXFP4 checkpoint.
    "gpt-oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
            "sliding_window": 4,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
            },
        },
    ),
}
GGUF_ARCH = {
    "mistral": "llama",
    "phi3-longrope": "phi3",
    "deepseek2-lite": "deepseek2",
    "deepseek2-v3": "deepseek2",
    "deepseek2-v2": "deepseek2",
}
# GGUF types per test case (default: F16, Q8_0, Q4_0); the later additions skip Q4_0 to keep
# the file's run time in check.
QTYPES = {
    "deepseek2-lite": ("f16", "q8_0"),
    "deepseek2-v3": ("f16", "q8_0"),
    # Q8_0 import of deepseek2 is covered above; with 32 experts in 8 groups its rounding flips
    # near-tied group and expert choices at more positions than ROUTER_FLIPS allows.
    "deepseek2-v2": ("f16",),
    "gpt-oss": ("f16", "mxfp4_moe", "mxfp4"),
}
# Mixture-of-experts cases whose quantized logits are checked per position (see ROUTER_FLIPS).
PER_POSITION = {"deepseek2-lite", "deepseek2-v3", "deepseek2-v2", "gpt-oss"}
# Quantized MoE models: a near-tie between two experts' router scores picks a different expert
# for a token after rounding (llama.cpp also rounds the activations to 8 bits), which moves that
# one token's logits by up to ~50% of the range in these tiny random models, in llama.cpp as
# much as in MLX. For PER_POSITION cases at most this share of the positions may exceed the
# dense tolerances (the maximum is reported), and where the greedy texts part, transformers'
# float32 model must pick MLX's token (i.e. llama.cpp's router flipped).
ROUTER_FLIPS = 0.1
# DeepSeek-V2 ranks its expert groups by their best expert (group_limited_greedy: transformers,
# mlx-lm, the import); llama.cpp ranks every router's groups by their best two (build_moe_ffn in
# llama-graph.cpp, DeepSeek-V3's rule), which picks other groups at ~25% of this prompt's
# positions. For these cases llama.cpp's logits are compared (per position, as ROUTER_FLIPS) only
# where both rules pick the same groups (same_group_choice) and greedy text with transformers'.
GROUP_RULE = {"deepseek2-v2"}
# OpenAI's MXFP4 checkpoints: expert weights as E2M1 codes (values below) with E8M0 scales.
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])  # codes 0-7; 8-15 negative
MXFP4_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
MXFP4_CONFIG = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
    ],
}  # fmt: skip
MXFP4_SPEC = {"group_size": 32, "bits": 4, "mode": "mxfp4"}  # what the import makes of them
TOKENIZER_CLASS = {"phi3": "GPT2Tokenizer", "phi3-longrope": "GPT2Tokenizer"}
# llama.cpp's converter reads these from tokenizer.model (SentencePiece) only.
SPM_ARCHS = {"gemma": False, "gemma2": False, "mistral": True}  # -> SentencePiece dummy prefix
SPM_SPECIAL = {"pad": "<pad>", "eos": "</s>", "bos": "<s>", "unk": "<unk>"}


@pytest.fixture(scope="module")
def tokenizer():
    tok = tm.byte_bpe(tm.CORPUS, 300, SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)


@pytest.fixture(scope="module")
def spm():
    """Tiny SentencePiece BPE models (byte fallback), as bytes, with/without a dummy prefix."""
    import sentencepiece

    def train(dummy_prefix: bool) -> bytes:
        out = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(tm.CORPUS.splitlines()), model_writer=out, vocab_size=500,
            model_type="bpe", byte_fallback=True, character_coverage=1.0,
            add_dummy_prefix=dummy_prefix, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            minloglevel=2, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        )  # fmt: skip
        return out.getvalue()

    return {prefix: train(prefix) for prefix in (False, True)}


def write_spm(proto: bytes, out_dir) -> tuple[list[int], dict]:
    """Write tokenizer.model (+ its special tokens); return the prompt's ids and the token ids."""
    import sentencepiece

    (out_dir / "tokenizer.model").write_bytes(proto)
    config = {f"{k}_token": v for k, v in SPM_SPECIAL.items()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    ids = {f"{k}_token_id": sp.piece_to_id(v) for k, v in SPM_SPECIAL.items() if k != "unk"}
    return sp.encode(PROMPT), {**ids, "vocab_size": sp.vocab_size()}


def build_hf_model(arch: str, tokenizer, spm, out_dir):
    """Save a tiny random transformers model for ``arch`` (with a tokenizer) into ``out_dir``.

    Returns the model and the prompt's token ids.
    """
    out_dir.mkdir()
    if arch in SPM_ARCHS:
        ids, token_ids = write_spm(spm[SPM_ARCHS[arch]], out_dir)
    else:
        ids = tokenizer.encode(PROMPT, add_special_tokens=False)
        token_ids = {
            "vocab_size": len(tokenizer),
            "bos_token_id": None,
            "eos_token_id": tokenizer.convert_tokens_to_ids(EOS),
            "pad_token_id": tokenizer.convert_tokens_to_ids(PAD),
        }
        tokenizer.save_pretrained(out_dir)
    if arch in TOKENIZER_CLASS:
        path = out_dir / "tokenizer_config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "tokenizer_class": TOKENIZER_CLASS[arch]}))
    config_cls, model_cls, overrides = MODELS[arch]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides, **token_ids})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # DeepSeek-V3's expert-selection bias starts at zero
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.3)
    model.save_pretrained(out_dir)
    return model, ids


def llama(path):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False
    )


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def position_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per prompt position: max |logit difference| / max |logit| (over the whole prompt)."""
    return np.abs(got - want).max(-1) / np.abs(want).max()


def check_mxfp4(gguf, out, quant) -> None:
    """The imported MXFP4 experts: MLX mxfp4 quantization that decodes to exactly what gguf-py's
    reference dequantizer (llama.cpp's block layout) reads from the GGUF."""
    import sys

    from converters.llama_cpp_tools import ensure_llama_cpp_tools

    sys.path.insert(0, str(ensure_llama_cpp_tools(download=False) / "gguf-py"))
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    finally:
        sys.path.pop(0)
    weights = mx.load(str(out / "model.safetensors"))
    experts = [t for t in GGUFReader(gguf).tensors if t.tensor_type.name == "MXFP4"]
    assert experts
    for t in experts:
        layer, kind = t.name.split(".")[1], t.name.split(".")[2].split("_")[1]
        module = f"model.layers.{layer}.mlp.experts.{kind}_proj"
        spec = quant.get(module, quant)  # per module, or the file's default
        assert {k: spec[k] for k in ("group_size", "bits", "mode")} == MXFP4_SPEC
        got = mx.dequantize(
            weights[f"{module}.weight"], weights[f"{module}.scales"], group_size=32, bits=4,
            mode="mxfp4", dtype=mx.float32,
        )  # fmt: skip
        want = dequantize(t.data, t.tensor_type).reshape(got.shape)
        assert np.array_equal(np.array(got), want), t.name


def mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of ``w`` [..., rows, cols] in groups of 32 along cols, as OpenAI's checkpoints store
    it: blocks [..., rows, cols / 32, 16] (two E2M1 codes a byte, the even element in the low
    nibble) and scales [..., rows, cols / 32] (E8M0: exponent + 127). Each group's exponent
    puts its largest magnitude in [4, 8) (6 at most); the codes round to the nearest value."""
    groups = w.reshape(*w.shape[:-1], -1, 32)
    exponent = torch.floor(torch.log2(groups.abs().amax(-1))) - 2
    scaled = groups / torch.exp2(exponent)[..., None]
    magnitude = (scaled.abs()[..., None] - E2M1).abs().argmin(-1)
    codes = (magnitude | (scaled < 0).long() << 3).to(torch.uint8)
    return codes[..., 0::2] | codes[..., 1::2] << 4, (exponent + 127).to(torch.uint8)


def write_mxfp4_checkpoint(src, dst):
    """Save the transformers gpt-oss folder ``src`` as an MXFP4 checkpoint in OpenAI's layout:
    the experts as ``*_blocks`` / ``*_scales`` of their [experts, out, in] weights (gate_up's
    rows interleaved) with ``quantization_config: {"quant_method": "mxfp4"}``, the rest as is.

    Returns the checkpoint as transformers loads it (its MXFP4 decoder), in float32.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    floats = {n: weights.pop(n) for n in list(weights) if n.endswith(MXFP4_EXPERTS)}
    for name, w in floats.items():
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = mxfp4_encode(w.transpose(1, 2))
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    ref = transformers.GptOssForCausalLM.from_pretrained(
        dst, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    params = dict(ref.named_parameters())
    for name, w in floats.items():  # read back as written: E2M1 is off by <= 1/4 of a group's max
        assert relative_error(params[name].detach().numpy(), w.numpy()) <= 0.25, name
    return ref


def check_checkpoint_experts(model, ref) -> None:
    """The imported experts decode exactly to the checkpoint's MXFP4 values, as transformers'
    decoder reads them (llama.cpp's converter splits gate_up's interleaved rows)."""
    for layer, ref_layer in zip(model.model.layers, ref.model.layers, strict=True):
        experts = ref_layer.mlp.experts
        gate_up = experts.gate_up_proj.detach().transpose(1, 2).numpy()
        want = {
            "gate_proj": gate_up[:, 0::2],
            "up_proj": gate_up[:, 1::2],
            "down_proj": experts.down_proj.detach().transpose(1, 2).numpy(),
        }
        for name, w in want.items():
            q = getattr(layer.mlp.experts, name)
            got = mx.dequantize(
                q.weight, q.scales, group_size=32, bits=4, mode="mxfp4", dtype=mx.float32
            )
            assert np.array_equal(np.array(got), w), name


def _top_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask of the ``k`` best of the groups scored ``scores`` [tokens, groups]."""
    return torch.zeros_like(scores).scatter(-1, scores.topk(k, -1).indices, 1.0)


def same_group_choice(hf, ids: list[int]) -> np.ndarray:
    """Per prompt position: whether ranking the expert groups by their best expert (DeepSeek-V2)
    and by their best two (llama.cpp) picks the same groups in every MoE layer of ``hf``.

    The tiny model's only MoE layer is its last: a different pick there moves only that
    position's logits.
    """
    logits = []
    routers = [m for m in hf.modules() if hasattr(m, "topk_group")]
    hooks = [r.register_forward_hook(lambda m, i, out: logits.append((m, out[0]))) for r in routers]
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    same = np.ones(len(ids), bool)
    for router, x in logits:
        scores = x.softmax(-1).view(len(ids), router.num_group, -1)
        best = _top_groups(scores.amax(-1), router.topk_group)
        best_two = _top_groups(scores.topk(2, -1).values.sum(-1), router.topk_group)
        same &= (best == best_two).all(-1).numpy()
    return same


def ungrouped_logits(model, ids: list[int]) -> np.ndarray:
    """Logits of the imported deepseek_v2 model with its expert groups switched off."""
    gates = [layer.mlp.gate for layer in model.model.layers if "gate" in layer.mlp]
    for gate in gates:
        gate.topk_method = "greedy"
    try:
        return np.array(model(mx.array([ids]))[0])
    finally:
        for gate in gates:
            gate.topk_method = "group_limited_greedy"


def check_group_routing(model, config: dict, hf, ids: list[int], want, to_hf: float) -> float:
    """The imported config keeps the checkpoint's expert groups, and they matter: without them
    the logits would fail the transformers check. Returns that (ungrouped) error."""
    keys = ("n_group", "topk_group", "topk_method")
    assert {k: config[k] for k in keys} == {k: getattr(hf.config, k) for k in keys}
    err = relative_error(ungrouped_logits(model, ids), want)
    assert err > to_hf, f"the expert groups change no expert here ({err:.2e})"
    return err


def hf_greedy(hf, ids: list[int], n: int, stop) -> list[int]:
    """Greedy continuation of ``ids`` by transformers (the whole sequence each step: tiny)."""
    out = []
    with torch.no_grad():
        while len(out) < n and (not out or out[-1] not in stop):
            out.append(int(hf(torch.tensor([ids + out])).logits[0, -1].argmax()))
    return out


@pytest.mark.parametrize("arch", list(MODELS))
def test_hf_to_gguf_to_mlx(arch, tokenizer, spm, tmp_path):
    from mlx_lm import load

    hf_dir = tmp_path / "hf"
    hf, ids = build_hf_model(arch, tokenizer, spm, hf_dir)

    report = {}
    for qtype in QTYPES.get(arch, ("f16", "q8_0", "q4_0")):
        gguf = tmp_path / f"{arch}-{qtype}.gguf"
        ref = hf  # the transformers model the import must reproduce
        if qtype in ("q4_0", "mxfp4_moe"):  # llama.cpp's quantizer, from the F16 file
            _quantize(tmp_path / f"{arch}-f16.gguf", gguf, qtype, lambda *_: None, 2)
        elif qtype == "mxfp4":  # llama.cpp's converter, from an MXFP4 checkpoint (F16 elsewhere)
            ref = write_mxfp4_checkpoint(hf_dir, tmp_path / "hf-mxfp4")
            mlx_to_gguf(tmp_path / "hf-mxfp4", gguf, "f16", pre_tokenizer=PRE)
        else:
            mlx_to_gguf(hf_dir, gguf, qtype, pre_tokenizer=PRE)
        with torch.no_grad():
            want = ref(torch.tensor([ids])).logits[0].numpy()
        assert read_gguf(gguf)[0]["general.architecture"] == GGUF_ARCH.get(arch, arch)
        start = time.perf_counter()
        out = convert_gguf(gguf, tmp_path / f"mlx-{qtype}", dtype="float32")
        seconds = time.perf_counter() - start
        config = json.loads((out / "config.json").read_text())
        quant = config.get("quantization")
        bits = {"f16": None, "q8_0": 8, "q4_0": 4, "mxfp4_moe": 8, "mxfp4": 4}[qtype]
        assert (quant or {}).get("bits") == bits
        if qtype in ("mxfp4_moe", "mxfp4"):
            check_mxfp4(gguf, out, quant)
        model, tok = load(str(out))
        if qtype == "mxfp4":
            check_checkpoint_experts(model, ref)
        assert tok.encode(PROMPT, add_special_tokens=False) == ids
        got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        err = relative_error(got, want)
        tolerance = MOE_TOLERANCE if "moe" in arch else {}
        to_hf, to_llama, min_agree = tolerance.get(qtype, TOLERANCE[qtype])
        if arch in GROUP_RULE:  # the groups are kept, and they change the experts chosen
            ungrouped = check_group_routing(model, config, hf, ids, want, to_hf)

        llm = llama(gguf)
        llm.eval(ids)
        llama_logits = np.array(llm.scores[: len(ids)])
        # llama.cpp's logits where it routes as the checkpoint does (see GROUP_RULE)
        keep = same_group_choice(ref, ids) if arch in GROUP_RULE else np.ones(len(ids), bool)
        err_llama = relative_error(got[keep], llama_logits[keep])
        agree = float((got.argmax(-1) == llama_logits.argmax(-1))[keep].mean())
        # router flips: a few positions may be off (see ROUTER_FLIPS); not against transformers
        # for MXFP4 from a checkpoint, whose experts transformers has as well
        flips = arch in PER_POSITION and qtype != "f16"
        if to_hf is not None and flips and qtype != "mxfp4":
            off_hf = float((position_errors(got, want) >= to_hf).mean())
            assert off_hf <= ROUTER_FLIPS, f"{qtype}: {off_hf:.0%} of positions off HF"
        elif to_hf is not None:
            assert err < to_hf, f"{qtype}: logits differ from transformers' by {err:.2e}"
        if flips or arch in GROUP_RULE:
            off_llama = float((position_errors(got, llama_logits)[keep] >= to_llama).mean())
            assert off_llama <= ROUTER_FLIPS, f"{qtype}: {off_llama:.0%} of positions off llama"
        else:
            assert err_llama < to_llama, (
                f"{qtype}: logits differ from llama.cpp's by {err_llama:.2e}"
            )
        assert agree >= min_agree, f"{qtype}: top-1 equals llama.cpp's at {agree:.0%} only"
        prompt_ids, llama_ids = llama_greedy(llm, PROMPT, GREEDY_TOKENS)
        assert prompt_ids == ids
        mlx_ids = tm.greedy_ids(model, tok, PROMPT, GREEDY_TOKENS)
        hf_ids = None
        if arch in GROUP_RULE or qtype == "mxfp4":  # transformers' text (llama.cpp: see above)
            hf_ids = hf_greedy(ref, ids, GREEDY_TOKENS, set(tok.eos_token_ids))
            assert mlx_ids == hf_ids, f"{qtype}: {tok.decode(mlx_ids)!r} != {tok.decode(hf_ids)!r}"
        elif qtype not in GREEDY_EXACT:
            pass
        elif flips and mlx_ids != llama_ids:  # transformers must side with MLX where they part
            pairs = enumerate(zip(mlx_ids, llama_ids, strict=False))
            k = next((i for i, (a, b) in pairs if a != b), None)
            assert k is not None, f"{qtype}: {mlx_ids} and {llama_ids} stop apart"
            with torch.no_grad():
                hf_next = int(ref(torch.tensor([ids + mlx_ids[:k]])).logits[0, -1].argmax())
            assert hf_next == mlx_ids[k], (
                f"{qtype}: greedy parts from llama.cpp's at token {k} and transformers picks "
                f"{hf_next}, not MLX's {mlx_ids[k]} (llama.cpp: {llama_ids[k]})"
            )
        else:
            assert mlx_ids == llama_ids, (
                f"{qtype}: {tok.decode(mlx_ids)!r} != {tok.decode(llama_ids)!r}"
            )
        for text in TEXTS:  # the rebuilt tokenizer splits text as llama.cpp does
            want_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert tok.encode(text, add_special_tokens=False) == want_ids, text
        size = sum(f.stat().st_size for f in out.iterdir())
        report[qtype] = {
            "rel_err_hf": err,
            "rel_err_llama": err_llama,
            "p90_err_hf": float(np.quantile(position_errors(got, want), 0.9)),
            "p90_err_llama": float(np.quantile(position_errors(got, llama_logits)[keep], 0.9)),
            "top1_agree_llama": agree,
            "greedy_equal": mlx_ids == llama_ids,
            "import_s": round(seconds, 3),
            "mlx_bytes": size,
            "greedy": tok.decode(mlx_ids),
        }
        if hf_ids is not None:
            report[qtype]["greedy_equal_hf"] = mlx_ids == hf_ids
        if arch in GROUP_RULE:
            report[qtype]["llama_positions"] = float(keep.mean())  # compared with llama.cpp
            report[qtype]["ungrouped_err_hf"] = ungrouped
    print(json.dumps({arch: report}))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from converters.gguf_to_mlx import model_config

    with pytest.raises(ValueError) as e:
        model_config({"general.architecture": "mamba"}, {})
    assert "'mamba'" in str(e.value)
    assert all(a in str(e.value) for a in ARCHITECTURES)


def _deepseek2_metadata(shape: tuple, groups: tuple) -> dict:
    """Minimal GGUF metadata of a DeepSeek MoE model: ``shape`` is (block_count, expert_count,
    expert_used_count, gating), ``groups`` (expert_group_count, expert_group_used_count), None
    where the GGUF lacks the key."""
    n_layers, n_experts, n_used, gating = shape
    values = {
        "block_count": n_layers, "embedding_length": 64, "feed_forward_length": 128,
        "attention.head_count": 4, "attention.head_count_kv": 1, "attention.kv_lora_rank": 32,
        "attention.key_length": 48, "attention.value_length": 32,
        "attention.key_length_mla": 48, "attention.value_length_mla": 32,
        "rope.dimension_count": 16, "expert_count": n_experts, "expert_used_count": n_used,
        "expert_feed_forward_length": 32, "expert_gating_func": gating,
        "expert_group_count": groups[0], "expert_group_used_count": groups[1],
    }  # fmt: skip
    return {
        "general.architecture": "deepseek2",
        **{f"deepseek2.{k}": v for k, v in values.items() if v is not None},
    }


@pytest.mark.parametrize(
    ("shape", "groups", "want"),
    [
        ((2, 32, 6, 1), (8, 3), (8, 3, "group_limited_greedy")),  # softmax: V2's rule
        ((2, 8, 2, 2), (4, 2), (4, 2, "noaux_tc")),  # sigmoid: V3's rule
        ((27, 64, 6, 1), (1, 1), (1, 1, "greedy")),  # V2-Lite
        ((2, 32, 6, 1), (4, 4), (1, 1, "greedy")),  # all groups used: no limit
        ((60, 160, 6, 1), (None, None), (8, 3, "group_limited_greedy")),  # V2 / V2.5, no keys
        ((61, 256, 8, 2), (None, None), (8, 4, "noaux_tc")),  # V3 / R1, no keys
        ((27, 64, 6, 1), (None, None), (1, 1, "greedy")),  # V2-Lite, no keys
        ((2, 32, 6, 1), (8, None), ValueError),  # llama.cpp asserts used groups > 0
        ((2, 32, 6, 1), (5, 2), ValueError),  # groups must divide the experts
    ],
)
def test_deepseek2_expert_groups(shape, groups, want):
    """The config's expert groups: the GGUF's, or for a GGUF without them its checkpoint's
    (DeepSeek-V2 and V3 shapes); how they are ranked follows the router (see _deepseek2_config)."""
    from converters.gguf_to_mlx import model_config

    metadata = _deepseek2_metadata(shape, groups)
    tensors = {"token_embd.weight": {"shape": (300, 64)}}
    if want is ValueError:
        with pytest.raises(ValueError, match="expert groups"):
            model_config(metadata, tensors)
        return
    config = model_config(metadata, tensors)
    assert (config["n_group"], config["topk_group"], config["topk_method"]) == want


def test_q4_k_m_stays_quantized(tokenizer, tmp_path):
    """A q4_k_m GGUF (llama.cpp's quantizer: Q4_K, and Q6_K where llama.cpp puts more bits)
    imports as MLX 4- and 6-bit groups of 32: each Q4_K sub-block is an affine 4-bit grid over
    32 weights, which the default recipe's searched scales recover; Q6_K is re-rounded."""
    from mlx_lm import load

    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    tokenizer.save_pretrained(hf_dir)
    config = transformers.LlamaConfig(  # K-quants need rows of 256 weights
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=len(tokenizer), tie_word_embeddings=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS), initializer_range=0.05,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(hf_dir)
    gguf = tmp_path / "q4_k_m.gguf"
    mlx_to_gguf(hf_dir, gguf, "q4_k_m", pre_tokenizer=PRE)
    types = {name: info["type"] for name, info in read_gguf(gguf)[1].items()}
    assert "Q4_K" in types.values() and "Q6_K" in types.values(), types

    quantized = convert_gguf(gguf, tmp_path / "native", dtype="float32")
    expanded = convert_gguf(gguf, tmp_path / "float", dtype="float32", dequantize=True)
    quant = json.loads((quantized / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 32 and quant["bits"] == 4
    six = {k for k, v in quant.items() if isinstance(v, dict) and v["bits"] == 8}
    assert six and all(types[_gguf_name(k)] == "Q6_K" for k in six), six  # Q6_K → 8 bits

    model_q, _ = load(str(quantized))
    model_f, _ = load(str(expanded))
    ids = mx.array([tokenizer.encode(PROMPT, add_special_tokens=False)])
    got, want = np.array(model_q(ids)[0]), np.array(model_f(ids)[0])
    error = relative_error(got, want)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    print(json.dumps({"q4_k_m_import": {"vs_float_import": error, "top1": agree}}))
    assert error < 2e-2 and agree >= 0.9
    # the Q4_K layers themselves: the recovered grid equals the file's weights
    q_proj = "model.layers.0.self_attn.q_proj"
    if types[_gguf_name(q_proj)] == "Q4_K":
        layer_q = model_q.model.layers[0].self_attn.q_proj
        w = mx.dequantize(layer_q.weight, layer_q.scales, layer_q.biases, group_size=32, bits=4)
        ref = model_f.model.layers[0].self_attn.q_proj.weight
        assert float(mx.abs(w - ref).max() / mx.abs(ref).max()) < 2e-3  # float16 expansion


def _gguf_name(mlx_module: str) -> str:
    """model.layers.0.self_attn.q_proj → blk.0.attn_q.weight (llama names)."""
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}  # fmt: skip
    if mlx_module.startswith("model.embed_tokens"):
        return "token_embd.weight"
    _, _, index, rest = mlx_module.split(".", 3)
    return f"blk.{index}.{names[rest]}.weight"

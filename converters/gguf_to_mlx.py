"""Import a llama.cpp GGUF file into an MLX model folder loadable by ``mlx_lm.load``.

Every GGML type llama.cpp writes is read (see ``SUPPORTED_TYPES``). Types whose blocks are
MLX affine groups of 32 stay quantized, losslessly: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K,
Q2_0, Q1_0 (see ``AFFINE_BITS``); MXFP4 and NVFP4 are repacked into MLX's ``mxfp4`` /
``nvfp4`` modes; F32, F16 and BF16 stay float tensors. The others (Q2_K, Q3_K, Q6_K, the
IQ and TQ types) are expanded to float32 by gguf-py (llama.cpp's own reference decoder) and
re-quantized to MLX affine groups of 32 with the bit widths of ``K_QUANT_BITS`` (measured).
``dequantize=True`` turns everything into plain float tensors
(``dtype="float32"`` is the fast layout on Linux CPUs). All float tensors,
quantization scales included, are cast to ``dtype`` (see ``default_dtype``).
Architectures (GGUF name -> mlx-lm model): llama (incl. SmolLM2 and Mistral),
qwen2, qwen3, gemma, gemma2, gemma3 (text-only, -> gemma3_text), phi3, granite,
olmo2, starcoder2, qwen3moe (-> qwen3_moe), qwen2moe (-> qwen2_moe), deepseek2
(DeepSeek-V2/V2-Lite/V2.5 -> deepseek_v2, sigmoid-routed V3/R1 -> deepseek_v3;
MLA with or without q LoRA, split or unsplit kv_b, YaRN, expert groups), gpt-oss
(-> gpt_oss); see ``ARCHITECTURES``. llama.cpp's Q/K row permutation (llama, granite) and Gemma's
``1 + w`` RMSNorm weights are undone; MoE experts stay stacked (``switch_mlp``);
Phi-3 LongRoPE factors become ``rope_scaling``. Where mlx-lm's model differs from
llama.cpp's, the import cannot help: Gemma 2 has no sliding window there (full
attention: equal up to the 4096-token window; Phi-3's llama.cpp ignores too),
LongRoPE always uses the long factors, StarCoder2 uses exact rather than tanh GELU, and
DeepSeek-V2's expert groups are ranked by their best expert (the checkpoint's rule; llama.cpp
ranks them by their best two, see _deepseek2_config).
The tokenizer is rebuilt from ``tokenizer.ggml.*``: byte-level BPE (``gpt2``) or
SentencePiece BPE (``llama``, e.g. Gemma, Mistral, Llama 2).

Usage: ``python -m converters.gguf_to_mlx IN.gguf OUT [--dtype float32] [--dequantize]``
"""

import argparse
import json
import mmap
import struct
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np

from converters.progress import step_bar
from mlxbackend import publish

GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0", 42: "Q2_0",
}  # fmt: skip
# Weights and bytes per block of the quantized types (ggml-common.h).
BLOCKS = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176),
    "Q6_K": (256, 210), "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ3_XXS": (256, 98),
    "IQ1_S": (256, 50), "IQ4_NL": (32, 18), "IQ3_S": (256, 110), "IQ2_S": (256, 82),
    "IQ4_XS": (256, 136), "IQ1_M": (256, 56), "TQ1_0": (256, 54), "TQ2_0": (256, 66),
    "MXFP4": (32, 17), "NVFP4": (64, 36), "Q1_0": (128, 18), "Q2_0": (64, 18),
}  # fmt: skip

# What mx.load does with each type (measured with mlx 0.32.4): Q4_0, Q4_1 and Q8_0 -> the MLX
# affine triplet (group size 32); F16, Q2_K, Q4_K and Q6_K -> float16, BF16 rounded to it;
# Q5_0, Q5_1, Q3_K, Q5_K and the IQ types fail the whole file ("gguf_tensor_to_f16 failed");
# TQ1_0, TQ2_0, MXFP4, NVFP4, Q1_0 and Q2_0 are silently dropped, and with them every tensor
# stored after the first one. So mx.load reads only files of MX_LOAD_TYPES (where it returns
# what is kept); any other file is read tensor by tensor with numpy (_read_numpy).
MX_LOAD_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0"}
NATIVE_TYPES = {"Q4_0", "Q4_1", "Q8_0"}  # mx.load's affine triplets
FLOAT_TYPES = {"F32", "F16", "BF16"}
# Blocks that are MLX affine groups of 32 (scale * code + bias), repacked exactly (see
# _AFFINE_DECODERS) -> bits: Q5_0 w = d * (q - 16), Q5_1 d * q + m, Q4_K/Q5_K 32-weight
# sub-blocks (d * sc) * q - dmin * m, Q2_0 d * (q - 1), Q1_0 +-d (1-bit: 2d * q - d). Exact in
# float32; a float16/bfloat16 ``dtype`` rounds the K-quants' d * sc scales.
AFFINE_BITS = {
    "Q8_0": 8, "Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5, "Q2_0": 2,
    "Q1_0": 1,
}  # fmt: skip
# E2M1 codes under 8-bit scales: MLX's own microscaling modes, repacked losslessly (_read_fp4)
# -> (mode, group size).
FP4_TYPES = {"MXFP4": ("mxfp4", 32), "NVFP4": ("nvfp4", 16)}
# The rest stays quantized too unless dequantize=True: expanded to float32 by gguf-py and
# re-quantized to MLX affine groups of 32 with the default recipe's searched scales
# (mlxbackend.quantize.recipe). Measured on SmolLM2-135M's token embedding (Q8_0, 4608 x 512)
# quantized by llama.cpp's quantizer (uniform importance matrix): RMS error of the MLX weights
# against the file's (gguf-py's dequantize) at 2/3/4/5/6/8 bits, then the file's own error
# against the original weights. The width kept is the smallest whose error is at most half the
# file's own (the imported weights stay within ~10 % of the file's fidelity):
#   Q2_K     25.2  11.4   5.2   2.5  1.2  0.3 %  (file 28.5 %)  -> 3
#   Q3_K     33.1  12.5   6.2   3.0  1.5  0.4 %  (file 16.2 %)  -> 4
#   Q6_K     34.6  16.3   7.7   3.7  1.8  0.4 %  (file  2.0 %)  -> 8
#   IQ4_NL   34.4  15.9   5.8   3.1  1.5  0.4 %  (file  8.3 %)  -> 5
#   IQ4_XS   34.4  15.9   5.8   3.1  1.5  0.4 %  (file  8.4 %)  -> 5
#   IQ3_XXS  34.4  15.6   6.1   3.1  1.4  0.4 %  (file 19.2 %)  -> 4
#   IQ3_S    34.1  15.5   6.4   3.1  1.7  0.4 %  (file 15.0 %)  -> 4
#   IQ2_XXS  28.0  12.5   4.0   2.1  1.2  0.3 %  (file 37.1 %)  -> 3
#   IQ2_XS   31.2  13.5   6.1   3.0  1.5  0.4 %  (file 31.8 %)  -> 3
#   IQ2_S    31.3  13.4   6.0   3.0  1.5  0.4 %  (file 27.5 %)  -> 3
#   IQ1_M    25.3  10.9   5.6   2.5  1.1  0.3 %  (file 48.0 %)  -> 3
#   IQ1_S, TQ1_0, TQ2_0: 0 at 2 bits (three levels per group of 32: the search finds them)
# Q4_K and Q5_K, re-quantized the same way, would be 0.05 % and 0.14 % off: hence AFFINE_BITS.
# A q4_k_m file keeps its own layout: 4 bits where it has Q4_K, 8 where llama.cpp put Q6_K.
K_QUANT_BITS = {
    "Q2_K": 3, "Q3_K": 4, "Q6_K": 8, "IQ4_NL": 5, "IQ4_XS": 5, "IQ3_XXS": 4, "IQ3_S": 4,
    "IQ2_XXS": 3, "IQ2_XS": 3, "IQ2_S": 3, "IQ1_S": 2, "IQ1_M": 3, "TQ1_0": 2, "TQ2_0": 2,
}  # fmt: skip
SUPPORTED_TYPES = FLOAT_TYPES | set(AFFINE_BITS) | set(FP4_TYPES) | set(K_QUANT_BITS)
GROUP_SIZE = 32
DTYPES = ("float16", "bfloat16", "float32")

# GGUF architecture -> mlx-lm model. Keys: model_type/class for config.json;
# permute_qk: llama.cpp permuted the Q/K rows (undone on import); norm_shift:
# llama.cpp stored Gemma's RMSNorm weights as 1 + w (mlx-lm adds the 1 itself);
# names: GGUF tensor names that map differently from _TOP_NAMES/_LAYER_NAMES
# (None: not loadable by that mlx-lm model);
# metadata: config key -> (GGUF key below "<arch>.", default; None = required);
# partial_rotary: rope may cover part of the head; longrope: rope_factors_*
# tensors become rope_scaling (LongRoPE); always_lm_head: the mlx-lm
# model cannot tie lm_head to the embedding, so a tied GGUF gets a copy; mla: DeepSeek's
# multi-head latent attention (head sizes from the *_mla keys, see _deepseek2_config).
_GEMMA2_NAMES = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Mixture of experts: llama.cpp stacks the experts as [n_expert, ...] like mlx-lm's SwitchGLU.
_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj",
    "ffn_down_exps": "mlp.switch_mlp.down_proj",
}
_MOE_METADATA = {
    "num_experts": ("expert_count", None),
    "num_experts_per_tok": ("expert_used_count", None),
    "moe_intermediate_size": ("expert_feed_forward_length", None),
}
ARCHITECTURES = {
    "llama": {"model_type": "llama", "class": "LlamaForCausalLM", "permute_qk": True},
    "qwen2": {"model_type": "qwen2", "class": "Qwen2ForCausalLM"},
    "qwen3": {"model_type": "qwen3", "class": "Qwen3ForCausalLM"},
    "gemma": {"model_type": "gemma", "class": "GemmaForCausalLM", "norm_shift": True},
    "gemma2": {
        "model_type": "gemma2",
        "class": "Gemma2ForCausalLM",
        "norm_shift": True,
        "names": _GEMMA2_NAMES,
        "metadata": {
            "attn_logit_softcapping": ("attn_logit_softcapping", None),
            "final_logit_softcapping": ("final_logit_softcapping", None),
        },
    },
    "gemma3": {
        "model_type": "gemma3_text",
        "class": "Gemma3ForCausalLM",
        "norm_shift": True,
        "names": _GEMMA2_NAMES,
        "metadata": {
            "sliding_window": ("attention.sliding_window", None),
            "sliding_window_pattern": ("attention.sliding_window_pattern", 6),
            "rope_local_base_freq": ("rope.freq_base_swa", 10000.0),
        },
    },
    "phi3": {
        "model_type": "phi3",
        "class": "Phi3ForCausalLM",
        "partial_rotary": True,
        "longrope": True,
        # mlx-lm's phi3 has only the fused projections (what llama.cpp's converter writes).
        "names": {
            "attn_qkv": "self_attn.qkv_proj",
            "ffn_up": "mlp.gate_up_proj",
            **dict.fromkeys(("attn_q", "attn_k", "attn_v", "ffn_gate")),
        },
        "metadata": {
            "original_max_position_embeddings": ("rope.scaling.original_context_length", 4096)
        },
    },
    "granite": {
        "model_type": "granite",
        "class": "GraniteForCausalLM",
        "permute_qk": True,
        "metadata": {
            "embedding_multiplier": ("embedding_scale", 1.0),
            "residual_multiplier": ("residual_scale", 1.0),
            "attention_multiplier": ("attention.scale", None),
            "logits_scaling": ("logit_scale", 1.0),
        },
    },
    "olmo2": {
        "model_type": "olmo2",
        "class": "Olmo2ForCausalLM",
        "names": {
            "post_attention_norm": "post_attention_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
    },
    "starcoder2": {
        "model_type": "starcoder2",
        "class": "Starcoder2ForCausalLM",
        "names": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
        "metadata": {"norm_epsilon": ("attention.layer_norm_epsilon", 1e-5)},
    },
    "qwen3moe": {
        "model_type": "qwen3_moe",
        "class": "Qwen3MoeForCausalLM",
        "names": _MOE_NAMES,
        "metadata": _MOE_METADATA,
    },
    "qwen2moe": {
        "model_type": "qwen2_moe",
        "class": "Qwen2MoeForCausalLM",
        "always_lm_head": True,
        "names": {
            **_MOE_NAMES,
            "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
            "ffn_up_shexp": "mlp.shared_expert.up_proj",
            "ffn_down_shexp": "mlp.shared_expert.down_proj",
            "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
        },
        "metadata": {
            **_MOE_METADATA,
            "shared_expert_intermediate_size": ("expert_shared_feed_forward_length", None),
        },
    },
    # DeepSeek-V2/V3 multi-head latent attention (MLA) + MoE. The model is picked by the router
    # (see _deepseek2_config): softmax -> deepseek_v2, sigmoid -> deepseek_v3.
    "deepseek2": {
        "model_type": "deepseek_v2",
        "class": "DeepseekV2ForCausalLM",
        "mla": True,
        "always_lm_head": True,
        "names": {
            "attn_q": "self_attn.q_proj",
            "attn_q_a": "self_attn.q_a_proj",
            "attn_q_a_norm": "self_attn.q_a_layernorm",
            "attn_q_b": "self_attn.q_b_proj",
            "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
            "attn_kv_a_norm": "self_attn.kv_a_layernorm",
            "attn_kv_b": "self_attn.kv_b_proj",  # older GGUFs: not split yet
            # Newer GGUFs split kv_b into per-head k_b (transposed) and v_b: these are exactly
            # deepseek_v3's MultiLinear embed_q / unembed_out; deepseek_v2 gets kv_b_proj back.
            "attn_k_b": "self_attn.embed_q",
            "attn_v_b": "self_attn.unembed_out",
            **_MOE_NAMES,
            "exp_probs_b": "mlp.gate.e_score_correction",  # .bias -> _bias (see _LEAF_RENAMES)
            "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
            "ffn_up_shexp": "mlp.shared_experts.up_proj",
            "ffn_down_shexp": "mlp.shared_experts.down_proj",
        },
    },
    # gpt-oss: attention sinks, biases everywhere, SwiGLU with clamp (mlx-lm's SwigluOAI, as
    # llama.cpp's SWIGLU_OAI), softmax over the top-k router logits; MXFP4 experts.
    "gpt-oss": {
        "model_type": "gpt_oss",
        "class": "GptOssForCausalLM",
        "always_lm_head": True,
        "names": {
            "attn_sinks": "self_attn.sinks",  # .weight -> the parameter itself
            "post_attention_norm": "post_attention_layernorm",
            "ffn_gate_inp": "mlp.router",
            "ffn_gate_exps": "mlp.experts.gate_proj",
            "ffn_up_exps": "mlp.experts.up_proj",
            "ffn_down_exps": "mlp.experts.down_proj",
            **dict.fromkeys(("ffn_norm", "ffn_gate", "ffn_up", "ffn_down")),
        },
        "metadata": {
            "num_local_experts": ("expert_count", None),
            "num_experts_per_tok": ("expert_used_count", None),
            "intermediate_size": ("expert_feed_forward_length", None),
            "sliding_window": ("attention.sliding_window", None),
        },
    },
}
# Weight names that are not "<module>.<GGUF leaf>".
_LEAF_RENAMES = {
    ".e_score_correction.bias": ".e_score_correction_bias",
    ".self_attn.sinks.weight": ".self_attn.sinks",
}

# Phi-3 LongRoPE frequency factors: rope settings, not weights (see rope_scaling).
_ROPE_FACTORS = ("rope_factors_long.weight", "rope_factors_short.weight")

_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> (pre-tokenizer kind, ignore_merges, default add_bos,
# clean_up_tokenization_spaces), following llama.cpp's llama-vocab.cpp.
_PRE_TOKENIZERS = {
    **{name: ("digits+gpt2", False, False, False) for name in ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva-7b")},
    **{name: ("gpt2", False, False, True) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais")},
    **{name: ("llama3", True, True, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: ("qwen2", False, False, False) for name in ("qwen2", "deepseek-r1-qwen")},
}  # fmt: skip
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4

ProgressFn = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------
# GGUF header


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}  # fmt: skip


def read_gguf(path) -> tuple[dict, dict]:
    """Read a GGUF header without loading tensor data.

    Returns ``(metadata, tensors)``: metadata as plain Python values and
    ``{name: {"shape", "type", "offset"}}`` with numpy-order shapes, GGML type
    names and absolute byte offsets. Raises ``ValueError`` for non-GGUF input.
    """
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (missing 'GGUF' magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse_header(buf, path)
            except (struct.error, UnicodeDecodeError, IndexError) as e:
                raise ValueError(f"{path}: truncated or corrupt GGUF header ({e})") from e


def _parse_header(buf, path):
    pos = 4

    def unpack(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string():
        nonlocal pos
        n = unpack("Q")
        s = bytes(buf[pos : pos + n]).decode("utf-8")
        pos += n
        return s

    def value(vtype):
        nonlocal pos
        if vtype == 8:
            return string()
        if vtype in _SCALARS:
            return unpack(_SCALARS[vtype])
        if vtype == 9:
            itype, n = unpack("IQ")
            if itype in _SCALARS and itype != 7:
                dt = np.dtype("<" + _SCALARS[itype])
                arr = np.frombuffer(buf, dtype=dt, count=n, offset=pos)
                pos += n * dt.itemsize
                return arr.tolist()
            return [value(itype) for _ in range(n)]
        raise ValueError(f"{path}: unknown GGUF metadata value type {vtype}")

    version = unpack("I")
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (need 2 or 3)")
    n_tensors, n_kv = unpack("QQ")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(unpack("I"))
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = [unpack("Q") for _ in range(unpack("I"))]
        ggml_type, offset = unpack("IQ")
        infos[name] = {
            "shape": tuple(reversed(dims)),
            "type": GGML_TYPES.get(ggml_type, f"type {ggml_type}"),
            "offset": offset,
        }
    alignment = metadata.get("general.alignment", 32)
    data_start = pos + (-pos) % alignment
    for info in infos.values():
        info["offset"] += data_start
    return metadata, infos


def write_gguf(path, metadata: dict, tensors: dict) -> None:
    """Write a minimal GGUF v3 file (used by the tests to build reference files).

    ``metadata`` values: bool, int (uint32, or int64 when negative or large),
    float (float32), str, or lists of str/int (int32)/float (float32).
    ``tensors``: name -> float32/float16 numpy array, or ``(type_name, shape,
    raw_bytes)`` for data that is already encoded (e.g. BF16 or quantized).
    """
    type_ids = {v: k for k, v in GGML_TYPES.items()}

    def s(x):
        b = x.encode("utf-8")
        return struct.pack("<Q", len(b)) + b

    def val(v):
        if isinstance(v, list):
            if all(isinstance(x, str) for x in v):
                return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(s(x) for x in v)
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            arr = np.asarray(v, "<i4" if ints else "<f4")
            return struct.pack("<IIQ", 9, 5 if ints else 6, len(v)) + arr.tobytes()
        if isinstance(v, bool):
            return struct.pack("<I?", 7, v)
        if isinstance(v, int):
            return struct.pack("<II", 4, v) if 0 <= v < 2**32 else struct.pack("<Iq", 11, v)
        if isinstance(v, float):
            return struct.pack("<If", 6, v)
        if isinstance(v, str):
            return struct.pack("<I", 8) + s(v)
        raise TypeError(f"unsupported GGUF metadata value {v!r}")

    head = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    head += [s(k) + val(v) for k, v in metadata.items()]
    blobs, offset = [], 0
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            kind = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}[t.dtype]
            t = (kind, t.shape, np.ascontiguousarray(t).astype(t.dtype.newbyteorder("<")).tobytes())
        kind, shape, raw = t
        head.append(
            s(name)
            + struct.pack(
                f"<I{len(shape)}QIQ", len(shape), *reversed(shape), type_ids[kind], offset
            )
        )
        blobs.append(raw + b"\0" * ((-len(raw)) % 32))
        offset += len(blobs[-1])
    header = b"".join(head)
    with open(path, "wb") as f:
        f.write(header + b"\0" * ((-len(header)) % 32))
        for blob in blobs:
            f.write(blob)


# ---------------------------------------------------------------------------
# Atomic output


@contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False):
    """Yield a staging folder beside ``out_dir`` and rename it into place on success
    (``mlxbackend.publish.atomic_folder``).

    A half-written folder never appears under the final name: on any error the
    temporary folder is removed. Raises ``FileExistsError`` if ``out_dir``
    exists and ``overwrite`` is false (also when it appears meanwhile).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    with publish.atomic_folder(out_dir) as tmp:  # fsync, rename into place; NoSpace on a full disk
        yield tmp
        if out_dir.exists() and not overwrite:
            raise FileExistsError(f"{out_dir} appeared while converting")


# ---------------------------------------------------------------------------
# Config


def _float32(x) -> float:
    """Shortest decimal that round-trips a float32 metadata value (1e-05, not 9.99e-06)."""
    return float(str(np.float32(x)))


def model_config(metadata: dict, tensors: dict) -> dict:
    """Build an mlx-lm ``config.json`` dict from GGUF metadata."""
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    spec = ARCHITECTURES[arch]

    def get(key, default=None):
        v = metadata.get(f"{arch}.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return v

    n_heads = get("attention.head_count")
    n_kv_heads = get("attention.head_count_kv", n_heads)
    ffn = get("feed_forward_length")
    if isinstance(n_heads, list) or isinstance(n_kv_heads, list) or isinstance(ffn, list):
        raise ValueError("per-layer head counts or feed-forward sizes are not supported")
    hidden = get("embedding_length")
    head_dim = metadata.get(f"{arch}.attention.key_length", hidden // n_heads)
    rope_dim = metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim and not spec.get("partial_rotary") and not spec.get("mla"):
        raise ValueError(
            f"partial rotary embeddings (rope dim {rope_dim} != head dim {head_dim}) are not supported"
        )
    if "rope_freqs.weight" in tensors:
        raise ValueError(
            "rope frequency factors (rope_freqs.weight, llama3-style rope scaling) are not supported"
        )
    if _ROPE_FACTORS[0] in tensors and not spec.get("longrope"):
        raise ValueError(f"LongRoPE factors ({_ROPE_FACTORS[0]}) are not supported for {arch}")
    embed = tensors.get("token_embd.weight")
    if embed is None:
        raise ValueError("GGUF has no token_embd.weight tensor")

    config = {
        "model_type": spec["model_type"],
        "architectures": [spec["class"]],
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": ffn,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": get("context_length", 4096),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        # Top level on purpose: mlx-lm's llama/qwen2 ignore rope_parameters.
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "vocab_size": embed["shape"][0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if rope_dim != head_dim and not spec.get("mla"):
        config["partial_rotary_factor"] = rope_dim / head_dim
    if arch in ("llama", "granite"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensors
    for key, (gguf_key, default) in spec.get("metadata", {}).items():
        value = get(gguf_key, default)
        config[key] = _float32(value) if isinstance(value, float) else value
    if arch in _CONFIG_HOOKS:
        _CONFIG_HOOKS[arch](config, metadata, tensors)
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if "rope_scaling" in config:
        pass  # set by the hook (YaRN)
    elif scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _float32(get("rope.scaling.factor"))}
    elif scaling != "none":
        raise ValueError(f"unsupported rope scaling type {scaling!r}")
    for key in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = token_id
    return config


def _gemma_scale(config: dict, n_layers_27b: int) -> None:
    """llama.cpp's Gemma attention scale: 1/sqrt(head_dim), but 1/sqrt(hidden/heads)
    for the 27B models, which it recognises by their layer count."""
    if config["num_hidden_layers"] == n_layers_27b:
        config["query_pre_attn_scalar"] = config["hidden_size"] // config["num_attention_heads"]
    else:
        config["query_pre_attn_scalar"] = config["head_dim"]


def _gemma3_config(config: dict, metadata: dict, tensors: dict) -> None:
    _gemma_scale(config, 62)
    pattern = config["sliding_window_pattern"]
    if isinstance(pattern, list):  # per-layer flags: mlx-lm only has "every n-th layer is global"
        n = pattern.index(False) + 1 if False in pattern else len(pattern) + 1
        if pattern != [(i + 1) % n != 0 for i in range(len(pattern))]:
            raise ValueError(f"unsupported Gemma 3 sliding-window layer pattern {pattern}")
        config["sliding_window_pattern"] = pattern = n
    if config["num_hidden_layers"] < pattern:
        raise ValueError(
            f"mlx-lm's gemma3_text needs at least {pattern} layers (sliding-window pattern)"
        )
    if metadata.get("gemma3.final_logit_softcapping"):
        raise ValueError("Gemma 3 final logit softcapping is not supported by mlx-lm")


def _olmo2_config(config: dict, metadata: dict, tensors: dict) -> None:
    if metadata.get("olmo2.attention.sliding_window"):
        raise ValueError("OLMo 3 sliding-window attention (olmo2 GGUF) is not supported")


def _qwen3moe_config(config: dict, metadata: dict, tensors: dict) -> None:
    # llama.cpp renormalises the chosen experts' weights for qwen3moe (not for qwen2moe).
    config.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)


GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # <arch>.expert_gating_func (gguf ExpertGatingFuncType)
# Expert groups of the grouped DeepSeek checkpoints, for GGUFs that do not record them: older
# llama.cpp converters did not write expert_group_count / expert_group_used_count, and llama.cpp
# runs such V2/V3/R1 files without groups. Keyed by (block_count, expert_count,
# expert_used_count, gating): (n_group, topk_group) of the checkpoint's config.json.
_DEEPSEEK_GROUPS = {
    (60, 160, 6, GATING_SOFTMAX): (8, 3),  # DeepSeek-V2, V2.5, Coder-V2 (236B)
    (61, 256, 8, GATING_SIGMOID): (8, 4),  # DeepSeek-V3, V3.1, R1
}


def _deepseek2_groups(metadata: dict, shape: tuple) -> tuple[int, int]:
    """(n_group, topk_group) of a DeepSeek router, (1, 1) without group limit.

    From ``deepseek2.expert_group_count`` / ``expert_group_used_count`` where the GGUF has them
    (llama.cpp's asserts apply: groups divide the experts, at least one is used); all groups
    used is no limit. A GGUF without them gets its checkpoint's groups if ``shape``
    (block_count, expert_count, expert_used_count, gating) is in ``_DEEPSEEK_GROUPS``, else none.
    """
    n_group = metadata.get("deepseek2.expert_group_count")
    if n_group is None:
        return _DEEPSEEK_GROUPS.get(shape, (1, 1))
    n_experts, topk_group = shape[1], metadata.get("deepseek2.expert_group_used_count", 0)
    if n_group > 1 and (n_experts % n_group or topk_group < 1):
        raise ValueError(
            f"invalid DeepSeek expert groups: {n_experts} experts in {n_group} groups, "
            f"{topk_group} used"
        )
    if n_group <= 1 or topk_group >= n_group:
        return 1, 1
    return n_group, topk_group


def _deepseek2_config(config: dict, metadata: dict, tensors: dict) -> None:
    """DeepSeek-V2/V3 (GGUF ``deepseek2``): MLA sizes, MoE routing and YaRN rope.

    llama.cpp's converter writes MLA as MQA: head_count_kv 1, key_length kv_lora_rank + rope
    dims; the real head sizes are key_length_mla / value_length_mla (older GGUFs: key_length /
    value_length). The router picks the mlx-lm model: softmax (V2, V2.5, V2-Lite; also the
    default when the GGUF does not say, as in llama.cpp) -> deepseek_v2, sigmoid with
    top-k renormalisation and the exp_probs_b bias (V3, R1, Kimi K2) -> deepseek_v3.
    Expert groups (see _deepseek2_groups) limit the experts to those of the best topk_group
    groups. How groups are ranked is not in the GGUF: the checkpoints' own rule is kept, by the
    best expert for softmax routers (V2's topk_method group_limited_greedy, as in DeepSeek's
    modeling code, transformers and mlx-lm's deepseek_v2), by the best two for sigmoid ones
    (V3's noaux_tc). llama.cpp ranks by the best two for every router (build_moe_ffn in
    llama-graph.cpp), so for V2 it picks other groups than the checkpoint where the two rules
    part.
    """

    def get(key, default=None):
        v = metadata.get(f"deepseek2.{key}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks deepseek2.{key}")
        return v

    n_heads, rope_dim = config["num_attention_heads"], get("rope.dimension_count")
    key_length = get("attention.key_length_mla", get("attention.key_length"))
    n_experts = metadata.get("deepseek2.expert_count")
    n_layers, n_vocab = config["num_hidden_layers"], config["vocab_size"]
    gating = metadata.get("deepseek2.expert_gating_func") or (
        # llama.cpp's default for GGUFs without the key: GLM-4.7-Flash (sigmoid), else softmax
        GATING_SIGMOID if n_layers in (47, 48) and n_vocab == 154880 else GATING_SOFTMAX
    )
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise ValueError(f"unsupported DeepSeek expert gating function {gating}")
    v3 = bool(n_experts) and gating == GATING_SIGMOID
    normalise = bool(metadata.get("deepseek2.expert_weights_norm", False))
    if n_experts and not v3:
        if normalise:
            raise ValueError("mlx-lm's deepseek_v2 cannot renormalise softmax expert weights")
        if any(n.endswith("exp_probs_b.bias") for n in tensors):
            raise ValueError("mlx-lm's deepseek_v2 has no expert selection bias (exp_probs_b)")
    if "blk.0.attn_kv_b.weight" in tensors and v3:
        raise ValueError("unsplit attn_kv_b (older GGUF) with a sigmoid router is not supported")
    if v3 and n_layers > 61:  # its sanitize() drops "model.layers.61*" (V3's MTP layer)
        raise ValueError("mlx-lm's deepseek_v3 cannot load more than 61 layers")
    if any(k.endswith(".weight") and ".nextn." in k for k in tensors):
        raise ValueError("DeepSeek multi-token-prediction (nextn) layers are not supported")
    config.update(
        model_type="deepseek_v3" if v3 else "deepseek_v2",
        architectures=["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        num_key_value_heads=n_heads,  # MLA: unused by mlx-lm
        kv_lora_rank=get("attention.kv_lora_rank"),
        q_lora_rank=metadata.get("deepseek2.attention.q_lora_rank"),  # None: plain q_proj
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=key_length - rope_dim,
        v_head_dim=get("attention.value_length_mla", get("attention.value_length")),
        first_k_dense_replace=get("leading_dense_block_count", 0),
        moe_layer_freq=1,
        attention_bias=False,
    )
    del config["head_dim"]
    if n_experts:
        shared = get("expert_shared_count", 0)
        n_used = get("expert_used_count")
        if isinstance(n_used, list):
            raise ValueError("per-layer expert counts are not supported")
        n_group, topk_group = _deepseek2_groups(metadata, (n_layers, n_experts, n_used, gating))
        config.update(
            n_routed_experts=n_experts,
            num_experts_per_tok=n_used,
            moe_intermediate_size=get("expert_feed_forward_length"),
            n_shared_experts=shared or None,
            # llama.cpp leaves the weights unscaled when the key is missing (or 0)
            routed_scaling_factor=_float32(get("expert_weights_scale", 0.0) or 1.0),
            n_group=n_group,
            topk_group=topk_group,
            topk_method="noaux_tc" if v3 else "group_limited_greedy" if n_group > 1 else "greedy",
        )
        if v3:
            config.update(scoring_func="sigmoid", norm_topk_prob=normalise)
    scaling = metadata.get("deepseek2.rope.scaling.type", "none")
    if scaling == "yarn":
        # The converter stores 0.1 * mscale_all_dim as yarn_log_multiplier; llama.cpp's rope
        # has no separate mscale, i.e. mscale == mscale_all_dim (as in all DeepSeek configs).
        mscale_all_dim = _float32(get("rope.scaling.yarn_log_multiplier", 0.0) / 0.1)
        config["rope_scaling"] = {
            "type": "yarn",
            "rope_type": "yarn",
            "factor": _float32(get("rope.scaling.factor")),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            "beta_fast": _float32(get("rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": _float32(get("rope.scaling.yarn_beta_slow", 1.0)),
            "mscale": mscale_all_dim,
            "mscale_all_dim": mscale_all_dim,
        }
    elif scaling == "none" and not v3:
        # mlx-lm's deepseek_v2 needs a rope_scaling dict; factor 1 is plain rope.
        config["rope_scaling"] = {"type": "yarn", "rope_type": "yarn", "factor": 1.0}
    elif scaling != "none":
        raise ValueError(f"unsupported rope scaling type {scaling!r} for deepseek2")


def _yarn_scaling(metadata: dict, arch: str) -> dict:
    """YaRN ``rope_scaling`` (mlx-lm's YarnRoPE, which, like llama.cpp, rounds the ramp ends)."""
    key = f"{arch}.rope.scaling."
    if metadata.get(key + "yarn_ext_factor", -1.0) not in (-1.0, 1.0) or metadata.get(
        key + "yarn_attn_factor", 1.0
    ) not in (0.0, 1.0):
        raise ValueError("YaRN with a custom extrapolation or attention factor is not supported")
    for name in ("factor", "original_context_length"):
        if key + name not in metadata:
            raise ValueError(f"GGUF metadata lacks {key}{name}")
    return {
        "rope_type": "yarn",
        "factor": _float32(metadata[key + "factor"]),
        "original_max_position_embeddings": metadata[key + "original_context_length"],
        "beta_fast": _float32(metadata.get(key + "yarn_beta_fast", 32.0)),
        "beta_slow": _float32(metadata.get(key + "yarn_beta_slow", 1.0)),
    }


def _gpt_oss_config(config: dict, metadata: dict, tensors: dict) -> None:
    """gpt-oss: sliding-window layers (llama.cpp's default: every other one, the first sliding)
    become ``layer_types``; YaRN rope."""
    n = config["num_hidden_layers"]
    pattern = metadata.get("gpt-oss.attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):
        swa = [bool(x) for x in pattern]
    else:  # llama.cpp's set_swa_pattern: every pattern-th layer is global
        swa = [pattern == 0 or i % pattern < pattern - 1 for i in range(n)]
    if len(swa) != n or all(swa) or not any(swa):
        raise ValueError(f"unsupported gpt-oss sliding-window layer pattern {pattern}")
    config["layer_types"] = ["sliding_attention" if x else "full_attention" for x in swa]
    scaling = metadata.get("gpt-oss.rope.scaling.type", "none")
    if scaling == "yarn":
        config["rope_scaling"] = _yarn_scaling(metadata, "gpt-oss")
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):  # mlx-lm's gpt_oss has biases
        if f"blk.0.{name}.weight" in tensors and f"blk.0.{name}.bias" not in tensors:
            raise ValueError(f"gpt-oss GGUF without {name} biases is not supported")


_CONFIG_HOOKS = {
    "deepseek2": _deepseek2_config,
    "gpt-oss": _gpt_oss_config,
    "gemma2": lambda config, *_: _gemma_scale(config, 46),
    "gemma3": _gemma3_config,
    "olmo2": _olmo2_config,
    "qwen3moe": _qwen3moe_config,
}


def longrope_scaling(path: Path, tensors: dict) -> dict:
    """Phi-3's LongRoPE ``rope_scaling`` from the ``rope_factors_long/short`` tensors.

    mlx-lm's SuScaledRoPE always applies the long factors (and the attention factor
    derived from max/original context, as llama.cpp's converter computes it); llama.cpp
    picks them only when its context is longer than the original one.
    """
    factors = {}
    for name, key in zip(_ROPE_FACTORS, ("long_factor", "short_factor"), strict=True):
        info = tensors.get(name)
        if info is None or info["type"] != "F32" or len(info["shape"]) != 1:
            raise ValueError(f"LongRoPE needs {name} as an F32 vector")
        raw = np.fromfile(path, dtype="<f4", count=info["shape"][0], offset=info["offset"])
        factors[key] = [_float32(x) for x in raw]
    return {"type": "longrope", **factors}


# ---------------------------------------------------------------------------
# Tokenizer


def _bpe_tokenizer(metadata: dict, vocab: dict):
    """Byte-level BPE (``gpt2`` vocabularies): ``(tokenizer, default add_bos, clean_up_spaces)``."""
    from tokenizers import Regex, Tokenizer, decoders, models
    from tokenizers import pre_tokenizers as pre

    pre_name = metadata.get("tokenizer.ggml.pre", "default")
    if pre_name not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported GGUF pre-tokenizer {pre_name!r} (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    pre_kind, ignore_merges, default_bos, clean_spaces = _PRE_TOKENIZERS[pre_name]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))

    if pre_kind == "digits+gpt2":
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre_kind == "gpt2":
        tok.pre_tokenizer = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        regex = _LLAMA3_REGEX if pre_kind == "llama3" else _QWEN2_REGEX
        tok.pre_tokenizer = pre.Sequence(
            [
                pre.Split(Regex(regex), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok, default_bos, clean_spaces


def _spm_tokenizer(metadata: dict, vocab: dict, types: list):
    """SentencePiece BPE (``llama`` vocabularies): ``(tokenizer, default add_bos, False)``.

    llama.cpp merges the adjacent pair whose concatenation is the highest-scoring token, so
    every split of a normal token into two tokens becomes a BPE merge ranked by that score.
    Spaces are ``▁`` (one is prepended to each text run when ``add_space_prefix``); characters
    outside the vocabulary fall back to the ``<0xXX>`` byte tokens.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = metadata.get("tokenizer.ggml.scores")
    if not scores:
        raise ValueError("GGUF tokenizer model 'llama' has no tokenizer.ggml.scores (merge order)")
    ranked = sorted(
        (-scores[i], i, k, t)
        for t, i in vocab.items()
        if types[i] == TOKEN_NORMAL
        for k in range(1, len(t))
        if t[:k] in vocab and t[k:] in vocab
    )
    merges = [(t[:k], t[k:]) for _, _, k, t in ranked]
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    tokens = metadata["tokenizer.ggml.tokens"]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("\u2581")] if space_prefix else []) + steps
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    return tok, True, False


def build_tokenizer(metadata: dict):
    """Rebuild a Hugging Face fast tokenizer from ``tokenizer.ggml.*``.

    Returns ``(tokenizer, tokenizer_config, generation_config)``. Handled:
    byte-level BPE (``tokenizer.ggml.model == "gpt2"``) and SentencePiece BPE
    (``"llama"``, e.g. Gemma's).
    """
    from tokenizers import AddedToken, processors

    kind = metadata.get("tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}: only 'gpt2' (byte-level BPE) and "
            "'llama' (SentencePiece BPE) are handled"
        )
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    if kind == "gpt2":
        tok, default_bos, clean_spaces = _bpe_tokenizer(metadata, vocab)
    else:
        tok, default_bos, clean_spaces = _spm_tokenizer(metadata, vocab, types)

    control = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_CONTROL]
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    for t in control + user:
        if tok.token_to_id(t) != vocab[t]:
            raise ValueError(f"special token {t!r} does not map back to id {vocab[t]}")

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}_token_id")
        return (i, tokens[i]) if i is not None and 0 <= i < len(tokens) else (None, None)

    bos_id, bos = token("bos")
    eos_id, eos = token("eos")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(
            ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
        )
        pair = single + " " + single.replace("$A:0", "$B:1").replace(":0", ":1")
        specials = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(dict(specials).items())
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": clean_spaces,
        "model_max_length": metadata.get(
            f"{metadata.get('general.architecture')}.context_length", 4096
        ),
    }
    for key, name in (
        ("bos", "bos_token"),
        ("eos", "eos_token"),
        ("unknown", "unk_token"),
        ("padding", "pad_token"),
    ):
        if (t := token(key)[1]) is not None:
            config[name] = t
    templates = {
        k.split(".", 2)[2]: v
        for k, v in metadata.items()
        if k.startswith("tokenizer.chat_template.")
    }
    if "tokenizer.chat_template" in metadata:
        if templates:
            default = {"name": "default", "template": metadata["tokenizer.chat_template"]}
            config["chat_template"] = [default] + [
                {"name": k, "template": v} for k, v in templates.items()
            ]
        else:
            config["chat_template"] = metadata["tokenizer.chat_template"]

    eos_ids = [i for k in ("eos", "eot", "eom") if (i := token(k)[0]) is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    generation = {}
    if bos_id is not None:
        generation["bos_token_id"] = bos_id
    if eos_ids:
        generation["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if (pad_id := token("padding")[0]) is not None:
        generation["pad_token_id"] = pad_id
    return tok, config, generation


# ---------------------------------------------------------------------------
# Weights


def _mlx_name(base: str, arch: str) -> str | None:
    """The mlx-lm module name for a GGUF tensor base name (``blk.3.attn_q``), or None."""
    if base in _TOP_NAMES:
        return _TOP_NAMES[base]
    names = {**_LAYER_NAMES, **ARCHITECTURES[arch].get("names", {})}
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and names.get(parts[2]):
        return f"model.layers.{parts[1]}.{names[parts[2]]}"
    return None


def _unpermute(x: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (rows only, so packed data, scales and biases alike)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _read_bf16(path: Path, info: dict) -> mx.array:
    """Read a BF16 tensor exactly (mx.load would round it to float16)."""
    count = int(np.prod(info["shape"]))
    raw = np.fromfile(path, dtype="<u2", count=count, offset=info["offset"])
    return mx.array(raw.reshape(info["shape"])).view(mx.bfloat16)


def _nibbles_in_order(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit block bytes (16 per 32 values: low nibbles hold values 0-15, high nibbles
    16-31) → MLX's order (two values per byte in sequence, low nibble first)."""
    codes = _nibbles(qs)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 4-bit block bytes → the codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits(qs: np.ndarray) -> np.ndarray:
    """Bytes (..., k) → their 8k bits, little-endian (bit j of the stream at index j)."""
    return np.unpackbits(qs, axis=-1, bitorder="little")


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte ``at`` of each block, as float32 (..., blocks, 1)."""
    return np.ascontiguousarray(blocks[..., at : at + 2]).view("<f2").astype(np.float32)


def _raw_blocks(path: Path, info: dict) -> np.ndarray:
    """A quantized tensor's bytes as ``(*lead, blocks per row, bytes per block)`` uint8."""
    *lead, n = info["shape"]
    size, nbytes = BLOCKS[info["type"]]
    if n % size:
        raise ValueError(f"{info['type']} tensor with a row length {n} not a multiple of {size}")
    count = int(np.prod(lead, dtype=np.int64)) * (n // size) * nbytes
    raw = np.fromfile(path, dtype=np.uint8, count=count, offset=info["offset"])
    return raw.reshape(*lead, n // size, nbytes)


def _read_fp4(path: Path, info: dict) -> tuple[mx.array, mx.array]:
    """Read an MXFP4 or NVFP4 tensor as MLX ``mode="mxfp4"`` / ``"nvfp4"`` quantization:
    ``(weight uint32, scales uint8)``.

    llama.cpp's ``block_mxfp4`` (17 bytes per 32 values): one E8M0 exponent, then 16 bytes
    whose low nibbles are values 0-15 and high nibbles values 16-31 (E2M1 codes; ggml doubles
    the code table and halves the scale, the same numbers). ``block_nvfp4`` (36 bytes per 64
    values): four UE4M3 scales, then 8 such bytes per 16 values. MLX packs the same codes in
    order, two per byte (low nibble first), under the same scale bytes (groups of 32 / 16), so
    this is a lossless repacking.
    """
    *lead, n = info["shape"]
    group = FP4_TYPES[info["type"]][1]
    blocks = _raw_blocks(path, info)
    n_scales = BLOCKS[info["type"]][0] // group
    packed = _nibbles_in_order(blocks[..., n_scales:].reshape(*lead, n // group, group // 2))
    weight = np.ascontiguousarray(packed).reshape(*lead, n // 2).view("<u4")
    scales = np.ascontiguousarray(blocks[..., :n_scales]).reshape(*lead, n // group)
    return mx.array(weight), mx.array(scales)


# Block decoders of AFFINE_BITS: block bytes (..., bytes) → (codes (..., weights) uint8,
# scales (..., groups of 32), biases), w = scale * code + bias as ggml decodes the block.


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b, 0)
    return (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8), d, -128 * d


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b, 0)
    return _nibbles(b[..., 2:]), d, -8 * d


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, ...]:
    return _nibbles(b[..., 4:]), _f16(b, 0), _f16(b, 2)


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = _f16(b, 0)
    return _nibbles(b[..., 6:]) | (_bits(b[..., 2:6]) << 4), d, -16 * d


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, ...]:
    return _nibbles(b[..., 8:]) | (_bits(b[..., 4:8]) << 4), _f16(b, 0), _f16(b, 2)


def _k_low(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes of low nibbles → 256 codes: each run of 32 bytes holds two
    sub-blocks of 32, the first in the low nibbles."""
    lead = qs.shape[:-1]
    qs = qs.reshape(*lead, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(*lead, 256)


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 6-bit sub-block scales and mins → (d * sc, -(dmin * m)), 8 per block."""
    from gguf.quants import Q4_K

    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[..., 4:16]).reshape(-1, 12))
    shape = (*b.shape[:-1], 8)
    return _f16(b, 0) * sc.reshape(shape), -(_f16(b, 2) * m.reshape(shape))


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, ...]:
    return _k_low(b[..., 16:]), *_k_scales(b)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, ...]:
    lead = b.shape[:-1]
    high = _bits(b[..., 16:48]).reshape(*lead, 32, 8)  # bit i of byte j: sub-block i, weight j
    high = high.swapaxes(-1, -2).reshape(*lead, 256)
    return _k_low(b[..., 48:]) | (high << 4), *_k_scales(b)


def _q2_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = np.repeat(_f16(b, 0), 2, axis=-1)  # one scale per 64 weights
    codes = (b[..., 2:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    return codes.reshape(*b.shape[:-1], 64), d, -d


def _q1_0(b: np.ndarray) -> tuple[np.ndarray, ...]:
    d = np.repeat(_f16(b, 0), 4, axis=-1)  # one scale per 128 weights, w = +-d
    return _bits(b[..., 2:]), 2 * d, -d


_AFFINE_DECODERS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q4_K": _q4_k, "Q5_K": _q5_k, "Q2_0": _q2_0, "Q1_0": _q1_0,
}  # fmt: skip


def _read_affine(path: Path, info: dict) -> tuple[mx.array, mx.array, mx.array]:
    """Read a tensor of AFFINE_BITS as the MLX affine triplet (packed uint32 weight, float32
    scales and biases, group size 32) holding exactly ggml's weights."""
    from mlxbackend.quantize.recipe import pack

    *lead, n = info["shape"]
    bits = AFFINE_BITS[info["type"]]
    codes, scales, biases = _AFFINE_DECODERS[info["type"]](_raw_blocks(path, info))
    weight = pack(codes.reshape(-1, n), bits).reshape(*lead, n * bits // 32)
    shape = (*lead, n // GROUP_SIZE)
    return weight, mx.array(scales.reshape(shape)), mx.array(biases.reshape(shape))


def _read_dequantized(path: Path, info: dict) -> mx.array:
    """Expand a tensor to float32 with gguf-py, llama.cpp's own reference decoder."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blocks = _raw_blocks(path, info)
    rows = blocks.reshape(-1, blocks.shape[-2] * blocks.shape[-1])
    w = dequantize(rows, GGMLQuantizationType[info["type"]])
    return mx.array(w.reshape(info["shape"]))


def _read_numpy(path: Path, info: dict, leaf: str) -> dict:
    """One tensor read from the file without mx.load: float arrays (F32, F16, BF16 exactly;
    the K_QUANT_BITS types expanded to float32), the MLX affine triplet for AFFINE_BITS, or
    weight and uint8 scales for FP4_TYPES."""
    kind, shape = info["type"], info["shape"]
    if kind == "BF16":
        return {leaf: _read_bf16(path, info)}
    if kind in ("F32", "F16"):
        count = int(np.prod(shape, dtype=np.int64))
        dt = "<f4" if kind == "F32" else "<f2"
        return {leaf: mx.array(np.fromfile(path, dt, count, offset=info["offset"]).reshape(shape))}
    if kind in FP4_TYPES:
        weight, scales = _read_fp4(path, info)
        return {leaf: weight, "scales": scales}
    if kind in AFFINE_BITS:
        weight, scales, biases = _read_affine(path, info)
        return {leaf: weight, "scales": scales, "biases": biases}
    return {leaf: _read_dequantized(path, info)}


def default_dtype(tensors: dict) -> str:
    """Pick the float dtype when none is given.

    On the CPU device float32: there MLX's float16/bfloat16 kernels, quantized
    matmuls included, ran 8-35x slower than float32 (measured, mlx 0.32.4).
    On a GPU: float32 for all-F32 files, bfloat16 if any matrix is BF16,
    float16 otherwise (exact for GGUF's float16 quantization scales).
    """
    if mx.default_device().type == mx.DeviceType.cpu:
        return "float32"
    matrix_types = {i["type"] for i in tensors.values() if len(i["shape"]) >= 2}
    if matrix_types <= {"F32"}:
        return "float32"
    return "bfloat16" if "BF16" in matrix_types else "float16"


def _requantizable(w: mx.array) -> bool:
    return w.ndim in (2, 3) and w.shape[-1] % GROUP_SIZE == 0


def _requantize(w: mx.array, n_bits: int) -> dict:
    """An expanded matrix (or stack of expert matrices) → MLX affine, group 32, searched."""
    from mlxbackend.quantize.recipe import quantize_searched

    flat = w.astype(mx.float32).reshape(-1, w.shape[-1])
    q, s, b = quantize_searched(flat, n_bits, GROUP_SIZE)
    lead = w.shape[:-1]
    return {
        "weight": q.reshape(*lead, -1),
        "scales": s.reshape(*lead, -1),
        "biases": b.reshape(*lead, -1),
    }


def convert_weights(
    path: Path,
    tensors: dict,
    config: dict,
    arch: str,
    dtype: str,
    dequantize: bool,
    progress: ProgressFn | None = None,
) -> tuple[dict, dict | None]:
    """Load GGUF tensors and return ``(mlx_weights, quantization_config_or_None)``."""
    bad = {n: i["type"] for n, i in tensors.items() if i["type"] not in SUPPORTED_TYPES}
    if bad:
        by_type = Counter(bad.values())
        example = next(iter(bad))
        raise ValueError(
            "unsupported GGUF tensor type(s) "
            + ", ".join(f"{t} ({n} tensors)" for t, n in by_type.items())
            + f", e.g. {example}; supported: {', '.join(sorted(SUPPORTED_TYPES))}"
        )
    unknown = [n for n in tensors if _mlx_name(n.rsplit(".", 1)[0], arch) is None]
    if unknown:
        raise ValueError(
            f"unsupported GGUF tensor name(s) for {config['model_type']}: {', '.join(unknown[:5])}"
        )

    dt = getattr(mx, dtype)
    spec = ARCHITECTURES[arch]
    permute, norm_shift = spec.get("permute_qk", False), spec.get("norm_shift", False)
    use_mx_load = all(i["type"] in MX_LOAD_TYPES for i in tensors.values())
    raw = mx.load(str(path)) if use_mx_load else {}
    out, bits, modes = {}, {}, {}
    for done, (name, info) in enumerate(tensors.items(), 1):
        base, leaf = name.rsplit(".", 1)
        target = _mlx_name(base, arch)
        if not use_mx_load:
            parts = _read_numpy(path, info, leaf)
        elif info["type"] == "BF16":
            raw.pop(name)
            parts = {leaf: _read_bf16(path, info)}
        elif info["type"] in NATIVE_TYPES:
            parts = {
                leaf: raw.pop(name),
                "scales": raw.pop(f"{base}.scales"),
                "biases": raw.pop(f"{base}.biases"),
            }
        else:
            parts = {leaf: raw.pop(name)}

        if permute and target.endswith(("q_proj", "k_proj")):
            n = (
                config["num_attention_heads"]
                if target.endswith("q_proj")
                else config["num_key_value_heads"]
            )
            parts = {k: _unpermute(v, n) for k, v in parts.items()}

        if target.endswith("shared_expert_gate") and parts[leaf].ndim == 1:
            parts = {leaf: parts[leaf][None]}  # llama.cpp's quantizer writes it as a vector

        if norm_shift and base.endswith("norm") and leaf == "weight":
            parts = {leaf: parts[leaf].astype(mx.float32) - 1}

        if info["type"] in K_QUANT_BITS and not dequantize and _requantizable(parts[leaf]):
            parts = _requantize(parts[leaf], K_QUANT_BITS[info["type"]])
            bits[target] = K_QUANT_BITS[info["type"]]
        if info["type"] in FP4_TYPES:
            mode, group = FP4_TYPES[info["type"]]
            if dequantize:
                w, s = parts["weight"], parts["scales"]
                parts = {
                    "weight": mx.dequantize(
                        w, s, group_size=group, bits=4, mode=mode, dtype=mx.float32
                    )
                }
            else:
                bits[target] = 4
                modes[target] = mode
        elif "scales" in parts:
            w, s, b = parts["weight"], parts["scales"], parts["biases"]
            n_bits = w.shape[-1] * 32 // (s.shape[-1] * GROUP_SIZE)
            if dequantize:
                f32 = mx.float32
                parts = {
                    "weight": mx.dequantize(
                        w, s.astype(f32), b.astype(f32), group_size=GROUP_SIZE, bits=n_bits
                    )
                }
            else:
                bits[target] = n_bits
        parts = {
            k: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in parts.items()
        }
        mx.eval(parts)
        out.update({f"{target}.{k}": v for k, v in parts.items()})
        if progress:
            progress(done, len(tensors), name)

    for old, new in _LEAF_RENAMES.items():
        out = {k.replace(old, new): v for k, v in out.items()}
    if arch == "deepseek2":
        _deepseek2_weights(out, bits, config, dt)
    if config.get("tie_word_embeddings"):
        out.pop("lm_head.weight", None)
        if spec.get("always_lm_head"):
            prefix = "model.embed_tokens."
            out.update(
                {"lm_head." + k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
            )
            if "model.embed_tokens" in bits:
                bits["lm_head"] = bits["model.embed_tokens"]
                if "model.embed_tokens" in modes:
                    modes["lm_head"] = modes["model.embed_tokens"]
    if not bits:
        return out, None
    groups = {"affine": GROUP_SIZE, **dict(FP4_TYPES.values())}
    kinds = {m: (b, modes.get(m, "affine")) for m, b in bits.items()}
    default = Counter(kinds.values()).most_common(1)[0][0]
    quant = {"group_size": groups[default[1]], "bits": default[0], "mode": default[1]}
    for module, (b, mode) in kinds.items():
        if (b, mode) != default:
            quant[module] = {"group_size": groups[mode], "bits": b, "mode": mode}
    return out, quant


def _deepseek2_weights(out: dict, bits: dict, config: dict, dt) -> None:
    """deepseek_v2: rebuild ``kv_b_proj`` from the split k_b / v_b (dequantized: k_b is
    quantized along the other axis); deepseek_v3: a zero expert-selection bias where the
    GGUF has none."""
    n_layers, first_moe = config["num_hidden_layers"], config["first_k_dense_replace"]
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        if config["model_type"] == "deepseek_v3":
            bias = prefix + "mlp.gate.e_score_correction_bias"
            if config.get("n_routed_experts") and i >= first_moe and bias not in out:
                out[bias] = mx.zeros((config["n_routed_experts"],), dt)
            continue
        halves = []
        for name in ("embed_q", "unembed_out"):
            module = prefix + "self_attn." + name
            if module + ".weight" not in out:
                break
            w = out.pop(module + ".weight")
            if module in bits:
                n_bits = bits.pop(module)
                w = mx.dequantize(
                    w,
                    out.pop(module + ".scales").astype(mx.float32),
                    out.pop(module + ".biases").astype(mx.float32),
                    group_size=GROUP_SIZE,
                    bits=n_bits,
                )
            halves.append(w)
        if len(halves) == 2:  # (heads, kv_lora, nope)^T ++ (heads, v, kv_lora) -> rows per head
            k_b, v_b = halves
            kv_b = mx.concatenate([k_b.swapaxes(1, 2), v_b], axis=1).astype(dt)
            out[prefix + "self_attn.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1])
            mx.eval(out[prefix + "self_attn.kv_b_proj.weight"])


def save_weights(folder: Path, weights: dict) -> None:
    """Write weights as ``model.safetensors`` (or shards plus an index), mlx-lm style."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    for i, shard in enumerate(shards, 1):
        name = fmt.format(i, len(shards))
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------
# Entry points


def convert_gguf(
    gguf_path,
    out_dir,
    dtype: str | None = None,
    dequantize: bool = False,
    *,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> Path:
    """Convert a GGUF file into an MLX model folder and return its path.

    ``dtype`` (float16, bfloat16, float32) is applied to every float tensor,
    quantization scales included; ``None`` picks one from the file
    (:func:`default_dtype`). ``dequantize=True`` writes plain float weights.
    The folder is built beside ``out_dir`` and renamed into place; an
    existing ``out_dir`` raises ``FileExistsError`` unless ``overwrite``.
    ``progress(done, total, tensor_name)`` is called after each tensor.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if not gguf_path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {gguf_path}")

    metadata, tensors = read_gguf(gguf_path)
    config = model_config(metadata, tensors)
    if _ROPE_FACTORS[0] in tensors:
        config["rope_scaling"] = longrope_scaling(gguf_path, tensors)
        tensors = {n: i for n, i in tensors.items() if n not in _ROPE_FACTORS}
    tokenizer, tokenizer_config, generation_config = build_tokenizer(metadata)
    if len(metadata["tokenizer.ggml.tokens"]) > config["vocab_size"]:
        raise ValueError("tokenizer has more tokens than the embedding has rows")

    dtype = dtype or default_dtype(tensors)
    weights, quant = convert_weights(
        gguf_path, tensors, config, metadata["general.architecture"], dtype, dequantize, progress
    )
    config["torch_dtype"] = dtype
    if quant:
        config["quantization"] = quant
        config["quantization_config"] = quant
    if "eos_token_id" in generation_config:
        config["eos_token_id"] = generation_config["eos_token_id"]

    with atomic_output_dir(out_dir, overwrite) as tmp:
        save_weights(tmp, weights)
        _write_json(tmp / "config.json", dict(sorted(config.items())))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", generation_config)
    return out_dir


def main(argv=None) -> int:
    """Command line: ``python -m converters.gguf_to_mlx IN.gguf OUT [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m converters.gguf_to_mlx",
        description="Import a llama.cpp GGUF file into an MLX model folder.",
    )
    parser.add_argument("gguf", help="input .gguf file")
    parser.add_argument("out", help="output folder (must not exist unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="float dtype (default: from the file)"
    )
    parser.add_argument("--dequantize", action="store_true", help="write plain float weights")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing output folder"
    )
    args = parser.parse_args(argv)

    try:
        with step_bar("loading", 32) as report:
            out = convert_gguf(
                args.gguf, args.out, dtype=args.dtype, dequantize=args.dequantize,
                overwrite=args.overwrite, progress=report,
            )  # fmt: skip
            report(None, None, "done")
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

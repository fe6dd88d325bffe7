"""GGUF import of more architectures: tiny random Hugging Face models, converted by llama.cpp.

Per architecture: a tiny random model is built with transformers (float32, CPU) and saved in
Hugging Face layout; llama.cpp's own ``convert_hf_to_gguf.py`` (through
``converters.mlx_to_gguf``) writes F16 and Q8_0 GGUFs; ``convert_gguf`` imports them and
``mlx_lm.load`` opens the folder. Checked: logits against transformers (float32) and against
llama.cpp (llama-cpp-python) on the same token ids, greedy decoding against llama.cpp on the
same GGUF token for token, and the rebuilt tokenizer against llama.cpp's on a few texts.
Each run prints the measured figures as one JSON line (``pytest -s``). Later cases (DeepSeek
MLA, gpt-oss with MXFP4 experts from llama.cpp's quantizer) skip Q4_0 and check their quantized
mixture-of-experts logits per position (see ROUTER_FLIPS).

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
    # gpt-oss: attention sinks, biases, a 4-token window on every other layer (the first
    # sliding, llama.cpp's default), clamped SwiGLU, YaRN as in gpt-oss's config (truncate false,
    # which llama.cpp and mlx-lm ignore: equal here). MXFP4: llama.cpp's quantizer (MXFP4_MOE:
    # MXFP4 experts, Q8_0 elsewhere); the converter writes MXFP4 only from MXFP4 checkpoints.
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
}
# GGUF types per test case (default: F16, Q8_0, Q4_0); the later additions skip Q4_0 to keep
# the file's run time in check.
QTYPES = {
    "deepseek2-lite": ("f16", "q8_0"),
    "deepseek2-v3": ("f16", "q8_0"),
    "gpt-oss": ("f16", "mxfp4_moe"),
}
# Mixture-of-experts cases whose quantized logits are checked per position (see ROUTER_FLIPS).
PER_POSITION = {"deepseek2-lite", "deepseek2-v3", "gpt-oss"}
# Quantized MoE models: a near-tie between two experts' router scores picks a different expert
# for a token after rounding (llama.cpp also rounds the activations to 8 bits), which moves that
# one token's logits by up to ~50% of the range in these tiny random models, in llama.cpp as
# much as in MLX. For PER_POSITION cases at most this share of the positions may exceed the
# dense tolerances (the maximum is reported), and where the greedy texts part, transformers'
# float32 model must pick MLX's token (i.e. llama.cpp's router flipped).
ROUTER_FLIPS = 0.1
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
        assert quant[module] == {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        got = mx.dequantize(
            weights[f"{module}.weight"], weights[f"{module}.scales"], group_size=32, bits=4,
            mode="mxfp4", dtype=mx.float32,
        )  # fmt: skip
        want = dequantize(t.data, t.tensor_type).reshape(got.shape)
        assert np.array_equal(np.array(got), want), t.name


@pytest.mark.parametrize("arch", list(MODELS))
def test_hf_to_gguf_to_mlx(arch, tokenizer, spm, tmp_path):
    from mlx_lm import load

    hf_dir = tmp_path / "hf"
    hf, ids = build_hf_model(arch, tokenizer, spm, hf_dir)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()

    report = {}
    for qtype in QTYPES.get(arch, ("f16", "q8_0", "q4_0")):
        gguf = tmp_path / f"{arch}-{qtype}.gguf"
        if qtype in ("q4_0", "mxfp4_moe"):  # llama.cpp's quantizer, from the F16 file
            _quantize(tmp_path / f"{arch}-f16.gguf", gguf, qtype, lambda *_: None, 2)
        else:
            mlx_to_gguf(hf_dir, gguf, qtype, pre_tokenizer=PRE)
        assert read_gguf(gguf)[0]["general.architecture"] == GGUF_ARCH.get(arch, arch)
        start = time.perf_counter()
        out = convert_gguf(gguf, tmp_path / f"mlx-{qtype}", dtype="float32")
        seconds = time.perf_counter() - start
        quant = json.loads((out / "config.json").read_text()).get("quantization")
        assert (quant or {}).get("bits") == {"f16": None, "q8_0": 8, "q4_0": 4, "mxfp4_moe": 8}[
            qtype
        ]
        if qtype == "mxfp4_moe":
            check_mxfp4(gguf, out, quant)
        model, tok = load(str(out))
        assert tok.encode(PROMPT, add_special_tokens=False) == ids
        got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
        err = relative_error(got, want)

        llm = llama(gguf)
        llm.eval(ids)
        llama_logits = np.array(llm.scores[: len(ids)])
        err_llama = relative_error(got, llama_logits)
        agree = float((got.argmax(-1) == llama_logits.argmax(-1)).mean())
        tolerance = MOE_TOLERANCE if "moe" in arch else {}
        to_hf, to_llama, min_agree = tolerance.get(qtype, TOLERANCE[qtype])
        flips = arch in PER_POSITION and qtype != "f16"
        to_hf = None if flips and qtype not in GREEDY_EXACT else to_hf
        if flips:  # router flips: per position, a few positions may be off (see ROUTER_FLIPS)
            if to_hf is not None:
                off_hf = float((position_errors(got, want) >= to_hf).mean())
                assert off_hf <= ROUTER_FLIPS, f"{qtype}: {off_hf:.0%} of positions off HF"
            off_llama = float((position_errors(got, llama_logits) >= to_llama).mean())
            assert off_llama <= ROUTER_FLIPS, f"{qtype}: {off_llama:.0%} of positions off llama"
        else:
            if to_hf is not None:
                assert err < to_hf, f"{qtype}: logits differ from transformers' by {err:.2e}"
            assert err_llama < to_llama, (
                f"{qtype}: logits differ from llama.cpp's by {err_llama:.2e}"
            )
        assert agree >= min_agree, f"{qtype}: top-1 equals llama.cpp's at {agree:.0%} only"
        prompt_ids, llama_ids = llama_greedy(llm, PROMPT, GREEDY_TOKENS)
        assert prompt_ids == ids
        mlx_ids = tm.greedy_ids(model, tok, PROMPT, GREEDY_TOKENS)
        if qtype not in GREEDY_EXACT:
            pass
        elif flips and mlx_ids != llama_ids:  # transformers must side with MLX where they part
            pairs = enumerate(zip(mlx_ids, llama_ids, strict=False))
            k = next((i for i, (a, b) in pairs if a != b), None)
            assert k is not None, f"{qtype}: {mlx_ids} and {llama_ids} stop apart"
            with torch.no_grad():
                hf_next = int(hf(torch.tensor([ids + mlx_ids[:k]])).logits[0, -1].argmax())
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
            "p90_err_llama": float(np.quantile(position_errors(got, llama_logits), 0.9)),
            "top1_agree_llama": agree,
            "greedy_equal": mlx_ids == llama_ids,
            "import_s": round(seconds, 3),
            "mlx_bytes": size,
            "greedy": tok.decode(mlx_ids),
        }
    print(json.dumps({arch: report}))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from converters.gguf_to_mlx import model_config

    with pytest.raises(ValueError) as e:
        model_config({"general.architecture": "mamba"}, {})
    assert "'mamba'" in str(e.value)
    assert all(a in str(e.value) for a in ARCHITECTURES)


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

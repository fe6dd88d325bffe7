"""GGUF import of more architectures: tiny random Hugging Face models, converted by llama.cpp.

Per architecture: a tiny random model is built with transformers (float32, CPU) and saved in
Hugging Face layout; llama.cpp's own ``convert_hf_to_gguf.py`` (through
``converters.mlx_to_gguf``) writes F16 and Q8_0 GGUFs; ``convert_gguf`` imports them and
``mlx_lm.load`` opens the folder. Checked: logits against transformers (float32) and against
llama.cpp (llama-cpp-python) on the same token ids, greedy decoding against llama.cpp on the
same GGUF token for token, and the rebuilt tokenizer against llama.cpp's on a few texts.
Each run prints the measured figures as one JSON line (``pytest -s``).

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
TOLERANCE = {"f16": (1e-2, 5e-3, 1.0), "q8_0": (8e-2, 5e-2, 0.8), "q4_0": (None, 8e-2, 0.8)}
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
}
GGUF_ARCH = {"mistral": "llama", "phi3-longrope": "phi3"}
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
    model.save_pretrained(out_dir)
    return model, ids


def llama(path):
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False
    )


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("arch", list(MODELS))
def test_hf_to_gguf_to_mlx(arch, tokenizer, spm, tmp_path):
    from mlx_lm import load

    hf_dir = tmp_path / "hf"
    hf, ids = build_hf_model(arch, tokenizer, spm, hf_dir)
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0].numpy()

    report = {}
    for qtype in ("f16", "q8_0", "q4_0"):
        gguf = tmp_path / f"{arch}-{qtype}.gguf"
        if qtype == "q4_0":  # llama.cpp's quantizer, from the F16 file
            _quantize(tmp_path / f"{arch}-f16.gguf", gguf, qtype, lambda *_: None, 2)
        else:
            mlx_to_gguf(hf_dir, gguf, qtype, pre_tokenizer=PRE)
        assert read_gguf(gguf)[0]["general.architecture"] == GGUF_ARCH.get(arch, arch)
        start = time.perf_counter()
        out = convert_gguf(gguf, tmp_path / f"mlx-{qtype}", dtype="float32")
        seconds = time.perf_counter() - start
        quant = json.loads((out / "config.json").read_text()).get("quantization")
        assert (quant or {}).get("bits") == {"f16": None, "q8_0": 8, "q4_0": 4}[qtype]
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
        if to_hf is not None:
            assert err < to_hf, f"{qtype}: logits differ from transformers' by {err:.2e}"
        assert err_llama < to_llama, f"{qtype}: logits differ from llama.cpp's by {err_llama:.2e}"
        assert agree >= min_agree, f"{qtype}: top-1 equals llama.cpp's at {agree:.0%} only"
        prompt_ids, llama_ids = llama_greedy(llm, PROMPT, GREEDY_TOKENS)
        assert prompt_ids == ids
        mlx_ids = tm.greedy_ids(model, tok, PROMPT, GREEDY_TOKENS)
        assert qtype == "q4_0" or mlx_ids == llama_ids, (
            f"{qtype}: {tok.decode(mlx_ids)!r} != {tok.decode(llama_ids)!r}"
        )
        for text in TEXTS:  # the rebuilt tokenizer splits text as llama.cpp does
            want_ids = llm.tokenize(text.encode(), add_bos=False, special=True)
            assert tok.encode(text, add_special_tokens=False) == want_ids, text
        size = sum(f.stat().st_size for f in out.iterdir())
        report[qtype] = {
            "rel_err_hf": err,
            "rel_err_llama": err_llama,
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

"""Build a tiny random Soprano in the real folder layout (mlx-community/Soprano-80M-bf16's), for
tests:

    OUT/config.json            (model_type soprano, SopranoForCausalLM, the Qwen3 sizes, and the
                                decoder's flat fields as Soprano-80M's config has them)
    OUT/model.safetensors      (language_model.* and decoder.* in MLX layout)
    OUT/tokenizer.json, tokenizer_config.json, special_tokens_map.json
                               (byte-level BPE with [STOP] [TEXT] [START]; pad = [STOP])

``build_tiny_soprano(out)`` → out. The language model is shrunk (hidden 64, 2 layers; sizes=SOPRANO_80M
builds Soprano-80M's shapes, for benchmarks); the decoder
keeps Soprano-80M's sizes (8 × 512, mlx-audio derives them from the folder name, so the folder must
not be called soprano-1.1). The decoder head is set so that samples are around 0.1, well inside [-1, 1]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from tests.tiny_model import added_tokens_decoder, byte_bpe

SPECIAL = ["[STOP]", "[TEXT]", "[START]"]
CORPUS = """Hello there, how are you today?
The quick brown fox jumps over the lazy dog.
Speech comes out of a small model sentence by sentence.
One, two, three, four, five. Six seven eight nine ten!
"""
DECODER = {  # Soprano-80M's decoder fields
    "decoder_num_layers": 8,
    "decoder_dim": 512,
    "decoder_intermediate_dim": 1536,
    "hop_length": 512,
    "n_fft": 2048,
    "upscale": 4,
    "input_kernel": 3,
    "dw_kernel": 3,
    "token_size": 2048,
}


def tokenizer() -> Tokenizer:
    return byte_bpe(CORPUS, 320, SPECIAL)


TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "intermediate_size": 128,
}
SOPRANO_80M = {  # Soprano-80M's language model (for benchmarks)
    "hidden_size": 512,
    "num_hidden_layers": 17,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 128,
    "intermediate_size": 2304,
    "vocab_size": 8192,
}


def config(tok: Tokenizer, sizes: dict) -> dict:
    return {
        "model_type": "soprano",
        "architectures": ["SopranoForCausalLM"],
        "vocab_size": tok.get_vocab_size(),
        **sizes,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "pad_token_id": tok.token_to_id("[STOP]"),
        "sample_rate": 32000,
        **DECODER,
    }


def write_tokenizer(out: Path, tok: Tokenizer) -> None:
    tok.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder(tok, SPECIAL, SPECIAL),
        "pad_token": "[STOP]",
        "bos_token": None,
        "eos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[STOP]"}, indent=1))


def build_tiny_soprano(out: Path, seed: int = 0, sizes: dict = TINY) -> Path:
    from mlx_audio.tts.models.soprano import soprano

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    tok = tokenizer()
    cfg = config(tok, sizes)
    model = soprano.Model(soprano.ModelConfig.from_dict({**cfg, "model_path": None}))
    sizes = model.config.decoder_config
    for key, value in DECODER.items():
        setattr(sizes, key, value)
    model = soprano.Model(model.config)  # rebuilt with Soprano-80M's decoder sizes
    head = model.decoder.head.out  # log-magnitudes around 4, phases around 0: samples ~0.1
    half = head.bias.shape[0] // 2
    head.weight = head.weight * 0.05
    head.bias = mx.concatenate([mx.full((half,), 4.0), mx.zeros((half,))])
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    write_tokenizer(out, tok)
    return out


if __name__ == "__main__":
    print(build_tiny_soprano(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/Soprano-tiny")))

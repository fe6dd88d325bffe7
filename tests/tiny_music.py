"""Build a tiny random MiniMax Music 3 in the layout mlx-audio's convert writes (what
mlx-community/MiniMax-Music3-* hold), for tests:

    OUT/config.json          (model_type minimax_music3, MiniMaxMusic3ForConditionalGeneration,
                              mlx-audio's ModelConfig.tiny() sizes)
    OUT/model.safetensors    (language_model.*, rvq_depth_decoder.*, condition_encoder.*,
                              transformer.*, vocoder.* in MLX layout)
    OUT/tokenizer/           (tokenizer.json, tokenizer_config.json: byte-level BPE with the
                              prompt's special tokens, as the official tokenizer/ folder has them)

``build_tiny_music(out, endless=False)`` → out. The token ids are laid out as the official ones
are (text, then the CFG and end tokens, then the audio codes); `endless=True` moves the end token
past the vocabulary, so a song always runs to its duration (several flow chunks)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from tokenizers import Tokenizer

from tests.tiny_model import added_tokens_decoder, byte_bpe

SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|caption_start|>",
    "<|caption_end|>",
    "<|lyrics_start|>",
    "<|lyrics_end|>",
    "<|audio_start|>",
]
CORPUS = """Warm acoustic pop with a soft female vocal and light drums.
[verse] Morning light on the window, [chorus] sing with me tonight.
Calm piano, slow tempo, bpm is 72, key is C major.
"""
IDS = {  # text ids stay below 400; then the CFG and end tokens, then the audio codes
    "vocab_size": 512,
    "audio_cfg_token_id": 400,
    "audio_end_token_id": 401,
    "audio_code_offset": 420,
    "semantic_vocab_size": 64,
}


def tokenizer() -> Tokenizer:
    tok = byte_bpe(CORPUS, 330, SPECIAL)
    assert tok.get_vocab_size() < IDS["audio_cfg_token_id"]
    return tok


def write_tokenizer(out: Path, tok: Tokenizer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added_tokens_decoder(tok, SPECIAL, SPECIAL),
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def build_tiny_music(out: Path, seed: int = 0, endless: bool = False) -> Path:
    from mlx_audio.music.models.minimax_music3 import Model, ModelConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    config = ModelConfig.tiny().to_dict()
    config.update(IDS)
    if endless:  # never allowed by ar_one_frame's mask: the song runs to its duration
        config["audio_end_token_id"] = config["vocab_size"] + 1
    config.pop("model_path", None)
    config["architectures"] = ["MiniMaxMusic3ForConditionalGeneration"]
    model = Model(ModelConfig.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(out / "tokenizer", tokenizer())
    return out


if __name__ == "__main__":
    print(build_tiny_music(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/MiniMax-Music3-tiny")))

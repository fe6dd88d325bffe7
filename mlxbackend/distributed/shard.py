"""Each rank's part of a model, loaded lazily so that a rank reads only its own weights.

Pipeline (any mlx-lm model whose blocks are one `layers` list called in order): like mlx-lm's
`pipeline()`, rank 0 keeps the last contiguous layer range and rank n-1 the first, so the hidden
state flows n-1 → … → 0 along ring neighbours and rank 0, which samples, ends with the logits.
Layers a rank does not own become weightless `Skip` stand-ins (same class attributes, no
weights); the stand-in just before the first owned layer receives the hidden state from rank+1,
the one just after the last owned layer sends it to rank-1. Their KV caches are advanced with
1-element dummies so masks and offsets match on every rank. The embedding is kept only where it
is used (rank n-1, and rank 0 for a tied output head).

Tensor: mlx-lm's own `model.shard(group)` (Megatron-style column/row split, all_sum inside)."""

import copy
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from mlxbackend.errors import InvalidInput
from mlxbackend.text.memory import loaded_bytes
from mlxbackend.text.models import fix_config, read_config

EMBED_NAMES = ("embed_tokens", "wte", "tok_embeddings", "word_embeddings", "embeddings")


class Skip(nn.Module):
    """A layer this rank does not own: passes the hidden state through (optionally receiving it
    from, or sending it to, a neighbour rank)."""

    def __call__(self, x, *args, **kwargs):
        role = self.__dict__.get("_role")
        if role is None:
            return x
        kind, peer, group, out = role
        if kind == "recv":
            return mx.distributed.recv_like(x, peer, group=group)
        out.sent = mx.distributed.send(x, peer, group=group)
        return out.sent


class EmbedStub(nn.Module):
    """An embedding this rank never evaluates: right shape and dtype, no weights."""

    def __init__(self, dims: int, dtype):
        super().__init__()
        self._shape = (dims, dtype)

    def __call__(self, ids):
        dims, dtype = self._shape
        return mx.zeros((*ids.shape, dims), dtype=dtype)

    def as_linear(self, x):
        return x


class Passthrough(nn.Module):
    def __call__(self, x, *args, **kwargs):
        return x


class Sent:
    sent = None


def skip_like(layer) -> nn.Module:
    """A Skip that is also an instance of the layer's class and keeps its plain attributes
    (`use_sliding`, `layer_type`, … read by some model bodies), without its weights."""
    cls = type(layer)
    stand_in = type(f"Skip{cls.__name__}", (Skip, cls), {})
    obj = dict.__new__(stand_in)
    nn.Module.__init__(obj)
    for key, value in vars(layer).items():
        if not isinstance(value, (mx.array, nn.Module)):
            object.__setattr__(obj, key, value)
    return obj


@dataclass
class Shard:
    """This rank's model and what it needs to run one forward step."""

    model: object
    mode: str
    rank: int
    size: int
    start: int = 0  # owned layers [start, end)
    end: int = 0
    template: list = field(default_factory=list)  # empty caches, copied per request
    skipped: list = field(default_factory=list)  # indices of stand-in layers
    out: Sent = field(default_factory=Sent)

    @property
    def weights(self) -> int:
        return loaded_bytes(self.model)

    def describe(self) -> str:
        if self.mode == "tensor":
            return f"tensor-parallel shard {self.rank}/{self.size}"
        return f"layers {self.start}-{self.end - 1}"

    def new_cache(self) -> list:
        return copy.deepcopy(self.template)

    def forward(self, tokens: mx.array, cache: list) -> mx.array:
        """Build this rank's graph for one step; returns the model output (lazy)."""
        out = self.model(tokens, cache=cache)
        if self.skipped:
            batch, length = tokens.shape[:2]
            dummy = mx.zeros((batch, 1, length, 1), dtype=mx.float32)
            for i in self.skipped:
                c = cache[i]
                if hasattr(c, "update_and_fetch") and hasattr(c, "offset"):
                    c.update_and_fetch(dummy, dummy)
        return out

    def settle(self, cache: list, out: mx.array):
        """Evaluate, inside the step, everything that involves other ranks, so that every rank runs
        the same collectives whatever the caller evaluates later (generate_step never evaluates
        the logits of a prefill chunk): the hidden state sent on (pipeline) or the last layer's
        output (tensor), and the KV updates. Rank 0's remaining graph (head, sampling) is local."""
        states = [c.state for c in cache if not _is_empty(c)]
        if self.rank == 0 and self.mode == "pipeline":
            mx.eval(states)  # its first owned layer's keys already depend on the received state
        else:
            mx.eval(self.out.sent, states)
        self.out.sent = None


def _is_empty(c) -> bool:
    try:
        return c.empty()
    except Exception:
        return False


def find_layers(model):
    """(owner module, layer list) for the blocks the model calls in order. `model.layers` may be
    a copy (mlx-lm's PipelineMixin slices it), so the owner's list is matched by its items."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, list) or not layers:
        raise InvalidInput(
            f"{type(model).__module__}: no `layers` list found; pipeline mode needs one"
        )
    for _, module in model.named_modules():
        own = module.get("layers", None)
        if (
            isinstance(own, list)
            and len(own) == len(layers)
            and all(a is b for a, b in zip(own, layers, strict=True))
        ):
            return module, own
    raise InvalidInput(
        f"{type(model).__module__}: its layer list is not a module attribute; pipeline mode needs one"
    )


def split_layers(n_layers: int, size: int, split=None) -> list:
    """Layers per rank, rank 0 first; the low ranks get the extra ones (mlx-lm's rule)."""
    if split:
        if sum(split) != n_layers:
            raise InvalidInput(
                f"distributed_split {split} must sum to the model's {n_layers} layers"
            )
        return list(split)
    if n_layers < size:
        raise InvalidInput(
            f"the model has {n_layers} layers, fewer than the {size} ranks of the group"
        )
    base, extra = divmod(n_layers, size)
    return [base + (1 if r < extra else 0) for r in range(size)]


def layer_range(split: list, rank: int) -> tuple:
    start = sum(split[rank + 1 :])
    return start, start + split[rank]


def pipeline(model, group, split=None) -> Shard:
    from mlx_lm.models.cache import make_prompt_cache

    rank, size = group.rank(), group.size()
    owner, layers = find_layers(model)
    template = make_prompt_cache(model)  # before the layers change (make_cache may read them)
    if len(template) != len(layers):
        raise InvalidInput(
            f"{type(model).__module__}: caches do not map one-to-one to layers; use tensor mode"
        )
    start, end = layer_range(split_layers(len(layers), size, split), rank)
    shard = Shard(model, "pipeline", rank, size, start, end, template)
    for i in range(len(layers)):
        if not start <= i < end:
            layers[i] = skip_like(layers[i])
            shard.skipped.append(i)
    if rank < size - 1:  # receive from the previous stage (rank + 1)
        object.__setattr__(layers[start - 1], "_role", ("recv", rank + 1, group, shard.out))
    if rank > 0:  # send to the next stage (rank - 1)
        object.__setattr__(layers[end], "_role", ("send", rank - 1, group, shard.out))
    tied = not hasattr(model, "lm_head")
    for name in EMBED_NAMES:
        embed = owner.get(name, None)
        if isinstance(embed, nn.Module):
            if rank != size - 1 and not (rank == 0 and tied):
                dtype = embed(mx.array([[0]])).dtype  # lazy: nothing is read
                setattr(owner, name, EmbedStub(_dims(model, embed), dtype))
            break
    if rank != 0 and isinstance(model.get("lm_head", None), nn.Module):
        model.lm_head = Passthrough()
    return shard


def tensor(model, group) -> Shard:
    from mlx_lm.models.cache import make_prompt_cache

    if not hasattr(model, "shard"):
        raise InvalidInput(
            f"{type(model).__module__}: mlx-lm has no tensor-parallel sharding for this architecture; "
            "use distributed_mode:pipeline"
        )
    try:
        model.shard(group)
    except Exception as exc:
        raise InvalidInput(
            f"tensor-parallel sharding failed: {exc}; use distributed_mode:pipeline"
        ) from None
    shard = Shard(
        model, "tensor", group.rank(), group.size(), 0, len(model.layers), make_prompt_cache(model)
    )
    tap(model.layers[-1], shard.out)
    return shard


def tap(layer, out: Sent):
    """Record the layer's output on every call (same object, same attributes and weights)."""
    cls = type(layer)

    def __call__(self, *args, **kwargs):
        out.sent = cls.__call__(self, *args, **kwargs)
        return out.sent

    layer.__class__ = type(f"Tapped{cls.__name__}", (cls,), {"__call__": __call__})


def check_tensor(config: dict, size: int):
    """Heads and MLP width must divide the group size (checked before any rank starts)."""
    text = config.get("text_config", config)
    dims = {
        "attention heads": text.get("num_attention_heads"),
        "KV heads": text.get("num_key_value_heads") or text.get("num_attention_heads"),
        "intermediate size": text.get("intermediate_size"),
    }
    bad = {k: v for k, v in dims.items() if isinstance(v, int) and v % size}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        raise InvalidInput(
            f"tensor parallelism over {size} ranks needs attention heads, KV heads and intermediate size "
            f"divisible by {size}; this model has {what}; use distributed_mode:pipeline"
        )


def load(path, group, mode: str, split=None, trust_remote_code: bool = False) -> Shard:
    """Build the model lazily, cut it to this rank's part, then read only those weights."""
    from mlx_lm.utils import load_model

    config = read_config(path)
    if mode == "tensor":
        check_tensor(config, group.size())
    model, _ = load_model(
        path, lazy=True, model_config=fix_config(config), trust_remote_code=trust_remote_code
    )
    shard = tensor(model, group) if mode == "tensor" else pipeline(model, group, split)
    mx.eval(model.parameters())
    model.eval()
    return shard


def _dims(model, embed) -> int:
    weight = embed.get("weight", None)
    if isinstance(weight, mx.array) and weight.ndim == 2 and not hasattr(embed, "scales"):
        return weight.shape[1]
    args = getattr(model, "args", None)
    text = getattr(args, "text_config", None) or args
    dims = (
        getattr(text, "hidden_size", None)
        if not isinstance(text, dict)
        else text.get("hidden_size")
    )
    if dims is None:
        raise InvalidInput(
            f"{type(model).__module__}: cannot tell the hidden size for the embedding stand-in"
        )
    return dims

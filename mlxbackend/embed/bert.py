"""BERT-family encoders (bert, roberta, xlm-roberta) in MLX: sentence embeddings and
cross-encoder relevance scores.

The module tree mirrors transformers' parameter names, so a Hugging Face checkpoint loads after
`sanitize` (which strips the `bert.`/`roberta.` prefix and drops buffers and pretraining heads).
A folder written by converters/encoder_to_mlx.py holds the sanitized weights and loads the same way.
Sentence-transformers settings (pooling, normalisation, max_seq_length) come from the folder's
modules.json, 1_Pooling/config.json and sentence_bert_config.json.

Sequences are right-padded; an additive attention mask hides the padding and pooling is
mask-aware, so a text gets the same vector alone or in a batch."""

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlxbackend.errors import InvalidInput
from mlxbackend.text.chat import char_budget

ENCODER_TYPES = {"bert", "roberta", "xlm-roberta"}
ROBERTA_TYPES = {"roberta", "xlm-roberta"}
POOLINGS = ("mean", "cls", "last", "max")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass on a GPU
CPU_BATCH_TOKENS = 1024  # on CPU larger batches run slower (measured: 8192 costs ~1.5x)
# Eigen's float32 erf: odd/even rational polynomials on [-4, 4], max error ~4e-7 like mx.erf's,
# but only multiply-adds, which run ~7x faster than MLX's scalar erf on CPU.
_ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04,
          -5.69250639462346e-05, -2.10102402082508e-06, 2.77068142495902e-08,
          -2.72614225801306e-10)  # fmt: skip
_ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03,
          -2.13374055278905e-04, -1.45660718464996e-05)  # fmt: skip


@partial(mx.compile, shapeless=True)
def _gelu_float32(x):
    z = mx.clip(x * (1 / math.sqrt(2)), -4.0, 4.0)
    z2 = z * z
    p, q = _ERF_P[-1], _ERF_Q[-1]
    for c in _ERF_P[-2::-1]:
        p = p * z2 + c
    for c in _ERF_Q[-2::-1]:
        q = q * z2 + c
    return x * (1 + z * p / q) / 2


def gelu(x):
    """Exact (erf) GELU, transformers' "gelu"; a fast erf polynomial in float32 (half-precision
    inputs would overflow it and use mx.erf)."""
    return _gelu_float32(x) if x.dtype == mx.float32 else nn.gelu(x)


ACTIVATIONS = {
    "gelu": gelu,  # exact (erf), as transformers' "gelu"
    "gelu_new": nn.gelu_approx,  # the tanh approximation
    "gelu_pytorch_tanh": nn.gelu_approx,
    "gelu_fast": nn.gelu_approx,
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}
# sentence-transformers' legacy pooling flags and its current mode names → ours
_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_POOLING_NAMES = {"cls": "cls", "max": "max", "mean": "mean", "lasttoken": "last", "last": "last"}
_ST_MODULES = {"Transformer", "Pooling", "Normalize"}
_DROP_PREFIXES = ("cls.", "lm_head.", "generator_lm_head.")
_DROP_SUFFIXES = ("position_ids", "token_type_ids")


# --------------------------------------------------------------------------- model


@dataclass
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Checked model arguments from an HF config.json dict (InvalidInput if unsupported)."""
        model_type = config.get("model_type")
        if model_type not in ENCODER_TYPES:
            raise InvalidInput(
                f"model_type {model_type!r} is not a supported encoder ({', '.join(sorted(ENCODER_TYPES))})"
            )
        required = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings",
        )  # fmt: skip
        missing = [k for k in required if not isinstance(config.get(k), int)]
        if missing:
            raise InvalidInput(f"encoder config.json lacks {', '.join(missing)}")
        position = config.get("position_embedding_type") or "absolute"
        if position != "absolute":
            raise InvalidInput(
                f"position_embedding_type {position!r} is not supported (only absolute)"
            )
        if config.get("is_decoder") or config.get("add_cross_attention"):
            raise InvalidInput("decoder/cross-attention BERT configs are not supported")
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise InvalidInput(f"hidden_act {act!r} is not supported ({', '.join(ACTIVATIONS)})")
        if config["hidden_size"] % config["num_attention_heads"]:
            raise InvalidInput("hidden_size is not a multiple of num_attention_heads")
        pad = config.get("pad_token_id")
        return cls(
            model_type=model_type,
            **{k: config[k] for k in required},
            type_vocab_size=int(config.get("type_vocab_size", 2) or 0),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=act,
            pad_token_id=int(pad if pad is not None else (1 if model_type in ROBERTA_TYPES else 0)),
        )

    @property
    def roberta(self) -> bool:
        return self.model_type in ROBERTA_TYPES

    @property
    def max_tokens(self) -> int:
        """The longest input the position table allows (roberta reserves padding_idx + 1 rows)."""
        offset = self.pad_token_id + 1 if self.roberta else 0
        return self.max_position_embeddings - offset


class Embeddings(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        if args.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, input_ids, position_ids, token_type_ids):
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if "token_type_embeddings" in self:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class SelfAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.heads = args.num_attention_heads
        self.scale = 1 / math.sqrt(args.hidden_size // args.num_attention_heads)
        self.query = nn.Linear(args.hidden_size, args.hidden_size)
        self.key = nn.Linear(args.hidden_size, args.hidden_size)
        self.value = nn.Linear(args.hidden_size, args.hidden_size)

    def __call__(self, x, mask):
        B, L, D = x.shape

        def split(t):
            return t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, D)


class Output(nn.Module):
    """dense → residual → post-LayerNorm (transformers' BertSelfOutput and BertOutput)."""

    def __init__(self, d_in: int, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(d_in, args.hidden_size)
        self.LayerNorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self = SelfAttention(args)
        self.output = Output(args.hidden_size, args)

    def __call__(self, x, mask):
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.intermediate_size)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.intermediate = Intermediate(args)
        self.output = Output(args.intermediate_size, args)

    def __call__(self, x, mask):
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class TransformerEncoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layer = [Layer(args) for _ in range(args.num_hidden_layers)]


class Pooler(nn.Module):
    """dense + tanh on the first token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)

    def __call__(self, hidden):
        return mx.tanh(self.dense(hidden[:, 0]))


class RobertaClassificationHead(nn.Module):
    """dense → tanh → out_proj on the first token."""

    def __init__(self, args: ModelArgs, num_labels: int):
        super().__init__()
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)
        self.out_proj = nn.Linear(args.hidden_size, num_labels)

    def __call__(self, hidden):
        return self.out_proj(mx.tanh(self.dense(hidden[:, 0])))


class Model(nn.Module):
    """The encoder body, with an optional pooler and sequence-classification head."""

    def __init__(self, args: ModelArgs, pooler: bool = False, num_labels: int = 0):
        super().__init__()
        self.args = args
        self.embeddings = Embeddings(args)
        self.encoder = TransformerEncoder(args)
        if pooler:
            self.pooler = Pooler(args)
        self.num_labels = num_labels
        if num_labels:
            self.classifier = (
                RobertaClassificationHead(args, num_labels)
                if args.roberta
                else nn.Linear(args.hidden_size, num_labels)
            )

    def __call__(self, input_ids, attention_mask, token_type_ids=None):
        """Last hidden states [B, L, D] for right-padded ids and a 0/1 attention mask [B, L]."""
        args = self.args
        B, L = input_ids.shape
        if args.roberta:  # transformers' create_position_ids_from_input_ids
            real = (input_ids != args.pad_token_id).astype(mx.int32)
            position_ids = mx.cumsum(real, axis=1) * real + args.pad_token_id
        else:
            position_ids = mx.broadcast_to(mx.arange(L)[None], (B, L))
        if token_type_ids is None or args.roberta:
            token_type_ids = mx.zeros((B, L), dtype=mx.int32)
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        keep = attention_mask.astype(mx.bool_)[:, None, None, :]
        mask = mx.where(keep, mx.array(0, x.dtype), mx.array(mx.finfo(x.dtype).min, x.dtype))
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def classify(self, hidden):
        """Classification logits [B, num_labels] from the last hidden states."""
        if self.args.roberta:
            return self.classifier(hidden)
        return self.classifier(self.pooler(hidden))


# --------------------------------------------------------------------------- weights


def sanitize(weights: dict) -> dict:
    """HF parameter names → ours: strip bert./roberta., drop buffers and pretraining heads."""
    out = {}
    for k, v in weights.items():
        for prefix in ("bert.", "roberta."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
                break
        if k.startswith(_DROP_PREFIXES) or k.endswith(_DROP_SUFFIXES):
            continue
        if k.endswith(".gamma"):  # very old checkpoints name the LayerNorm parameters gamma/beta
            k = k[: -len("gamma")] + "weight"
        elif k.endswith(".beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _torch_to_mx(t):
    t = t.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
        return mx.array(t.float().numpy()).astype(mx.bfloat16)
    return mx.array(t.numpy())


def read_weights(path) -> dict:
    """The sanitized weights of an HF or MLX encoder folder (model*.safetensors, or
    pytorch_model*.bin when torch is installed)."""
    path = Path(path)
    files = sorted(path.glob("model*.safetensors"))
    raw = {}
    if files:
        for f in files:
            raw.update(mx.load(str(f)))
        return sanitize(raw)
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise InvalidInput(f"{path} has no model.safetensors (or pytorch_model.bin) weights")
    try:
        import torch
    except ImportError as e:
        raise InvalidInput(
            f"{path} holds only pytorch_model.bin, which needs torch to read; convert it once on a "
            "machine with torch: python -m converters.encoder_to_mlx SRC DST"
        ) from e
    for f in bins:
        try:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
        except Exception as e:
            raise InvalidInput(f"could not read {f}: {type(e).__name__}: {e}") from e
        raw.update({k: _torch_to_mx(v) for k, v in state.items()})
    return sanitize(raw)


def _names(keys, limit=8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" … ({len(keys)} in all)" if len(keys) > limit else "")


def build_model(config: dict, weights: dict, dtype=None, where="the checkpoint") -> Model:
    """A Model for config with weights loaded strictly (InvalidInput on missing, unexpected
    or mis-shaped weights). Floating weights are cast to dtype when given."""
    args = ModelArgs.from_config(config)
    architectures = " ".join(config.get("architectures") or [])
    classifier = "ForSequenceClassification" in architectures or any(
        k.startswith("classifier.") for k in weights
    )
    num_labels = 0
    if classifier:
        head = weights.get("classifier.out_proj.weight" if args.roberta else "classifier.weight")
        num_labels = head.shape[0] if head is not None else int(config.get("num_labels") or 0)
        num_labels = num_labels or len(config.get("id2label") or {}) or 2
    pooler = any(k.startswith("pooler.") for k in weights) or (classifier and not args.roberta)
    model = Model(args, pooler=pooler, num_labels=num_labels)
    expected = dict(tree_flatten(model.parameters()))
    missing = set(expected) - set(weights)
    extra = set(weights) - set(expected)
    if missing or extra:
        raise InvalidInput(
            f"the weights in {where} do not match a {args.model_type} "
            f"{'cross-encoder' if num_labels else 'encoder'} of this config"
            + (f"; missing: {_names(missing)}" if missing else "")
            + (f"; unexpected: {_names(extra)}" if extra else "")
        )
    for k, p in expected.items():
        if tuple(weights[k].shape) != tuple(p.shape):
            raise InvalidInput(
                f"{k} in {where} has shape {tuple(weights[k].shape)}, the config needs {tuple(p.shape)}"
            )
    if dtype is not None:
        weights = {
            k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    mx.eval(model.parameters())
    return model


# --------------------------------------------------------------------------- folder


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InvalidInput(f"cannot read {path}: {e}") from e


def read_config(path) -> dict:
    """config.json of an encoder folder (InvalidInput if absent or not an encoder)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InvalidInput(f"{path} has no config.json; not a model folder")
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or config.get("model_type") not in ENCODER_TYPES:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise InvalidInput(
            f"{path} is not a BERT-family encoder (model_type {found!r}; "
            f"supported: {', '.join(sorted(ENCODER_TYPES))})"
        )
    return config


def is_encoder_dir(path) -> bool:
    """True for a folder whose config.json names a supported encoder model_type."""
    try:
        return read_config(path) is not None
    except (InvalidInput, OSError):
        return False


def st_settings(path: Path) -> dict:
    """pooling / normalize / max_seq_length / do_lower_case from the sentence-transformers files."""
    out = {"pooling": "mean", "normalize": True, "max_seq_length": None, "do_lower_case": False}
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = _read_json(modules_file)
        kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
        unknown = [k for k in kinds if k not in _ST_MODULES]
        if unknown:
            raise InvalidInput(
                f"{path}: sentence-transformers modules {unknown} are not supported "
                "(only Transformer, Pooling, Normalize)"
            )
        out["normalize"] = "Normalize" in kinds
        for m, kind in zip(modules, kinds, strict=True):
            if kind == "Pooling":
                pool_file = path / m.get("path", "") / "config.json"
                if pool_file.is_file():
                    out["pooling"] = _pooling_mode(_read_json(pool_file), pool_file)
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        cfg = _read_json(sbert)
        if cfg.get("max_seq_length"):
            out["max_seq_length"] = int(cfg["max_seq_length"])
        out["do_lower_case"] = bool(cfg.get("do_lower_case", False))
    return out


def _pooling_mode(cfg: dict, where) -> str:
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for flag, mode in _POOLING_FLAGS.items() if cfg.get(flag)] or ["mean"]
    if isinstance(modes, str):
        modes = [modes]
    if len(modes) != 1 or modes[0] not in _POOLING_NAMES:
        raise InvalidInput(
            f"{where}: pooling {modes} is not supported (one of {', '.join(POOLINGS)})"
        )
    return _POOLING_NAMES[modes[0]]


def _dtype(dtype):
    if dtype is None:  # float32 on CPU; the stored dtype on a GPU
        return mx.float32 if mx.default_device() == mx.cpu else None
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise InvalidInput(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[dtype]


@dataclass
class Encoder:
    model: "nn.Module"
    tokenizer: object
    config: dict
    path: Path
    max_length: int
    pooling: str
    normalize: bool
    num_labels: int
    dims: int
    do_lower_case: bool = False


def load_encoder(path, pooling=None, normalize=None, max_length=None, dtype=None) -> Encoder:
    """Load an HF or MLX encoder folder. Keyword overrides win over the folder's files;
    max_length is capped by the position table."""
    path = Path(path).expanduser()
    config = read_config(path)
    model = build_model(config, read_weights(path), _dtype(dtype), where=str(path))
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise InvalidInput(f"cannot load the tokenizer of {path}: {type(e).__name__}: {e}") from e
    st = st_settings(path)
    if pooling is not None and pooling not in POOLINGS:
        raise InvalidInput(f"unknown pooling {pooling!r} (one of {', '.join(POOLINGS)})")
    limit = model.args.max_tokens
    if max_length is None:
        max_length = st["max_seq_length"]
        if max_length is None:
            max_length = limit
            tok_max = getattr(tokenizer, "model_max_length", None)
            if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
                max_length = min(max_length, tok_max)
    elif not isinstance(max_length, int) or max_length < 2:
        raise InvalidInput(f"max_length must be an integer ≥ 2, got {max_length!r}")
    return Encoder(
        model=model,
        tokenizer=tokenizer,
        config=config,
        path=path,
        max_length=min(int(max_length), limit),
        pooling=pooling or st["pooling"],
        normalize=st["normalize"] if normalize is None else bool(normalize),
        num_labels=model.num_labels,
        dims=model.args.hidden_size,
        do_lower_case=st["do_lower_case"],
    )


# --------------------------------------------------------------------------- inference


def _groups(lengths: list, max_tokens: int | None = None):
    """Index groups of similar length whose padded size stays under max_tokens."""
    if max_tokens is None:
        max_tokens = CPU_BATCH_TOKENS if mx.default_device() == mx.cpu else MAX_BATCH_TOKENS
    group, longest = [], 0
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if group and max(longest, lengths[i]) * (len(group) + 1) > max_tokens:
            yield group
            group, longest = [], 0
        group.append(i)
        longest = max(longest, lengths[i])
    if group:
        yield group


def _forward(enc: Encoder, ids: list, types: list | None):
    """Right-pad one group and run the encoder: hidden states [B, L, D] and the mask [B, L]."""
    longest = max(len(t) for t in ids)
    pad = (
        enc.model.args.pad_token_id if enc.model.args.roberta else (enc.tokenizer.pad_token_id or 0)
    )
    input_ids = np.full((len(ids), longest), pad, dtype=np.int32)
    mask = np.zeros((len(ids), longest), dtype=np.int32)
    token_types = np.zeros((len(ids), longest), dtype=np.int32)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
        if types is not None:
            token_types[row, : len(seq)] = types[row]
    mask = mx.array(mask)
    hidden = enc.model(mx.array(input_ids), mask, mx.array(token_types))
    return hidden, mask


def pool(hidden, mask, mode: str, normalize: bool):
    """Mask-aware pooling of hidden states [B, L, D] (float32), optionally L2-normalised."""
    hidden = hidden.astype(mx.float32)
    m = mask.astype(mx.float32)[..., None]
    if mode == "mean":
        out = (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1e-9)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = mx.where(m > 0, hidden, -mx.inf).max(axis=1)
    elif mode == "last":
        last = mx.maximum(mask.sum(axis=1) - 1, 0).astype(mx.int32)
        out = mx.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    else:
        raise InvalidInput(f"unknown pooling {mode!r} (one of {', '.join(POOLINGS)})")
    if normalize:
        out = out / mx.maximum(mx.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def _check_texts(texts, what="texts"):
    if not all(isinstance(t, str) for t in texts):
        raise InvalidInput(f"{what} must be strings")


def _tokenize(enc: Encoder, first: list, second: list | None = None):
    budget = char_budget(enc.tokenizer, enc.max_length)  # truncation keeps ≤ max_length tokens:
    first = [t[:budget] for t in first]  # do not tokenize the rest of a 45 MB text (a minute+)
    second = None if second is None else [t[:budget] for t in second]
    if enc.do_lower_case:
        first = [t.lower() for t in first]
        second = None if second is None else [t.lower() for t in second]
    batch = enc.tokenizer(
        first, second, truncation="longest_first", max_length=enc.max_length, padding=False,
        return_attention_mask=False,
    )  # fmt: skip
    ids = batch["input_ids"]
    types = batch.get("token_type_ids") if not enc.model.args.roberta else None
    return ids, types


def embed(enc: Encoder, texts: list, between_batches=None) -> tuple:
    """Pooled embeddings [B, dims] float32 (L2-normalised when enc.normalize) and each text's
    token count after truncation to enc.max_length. An item may also be a list of token ids
    (LocalAI's EmbeddingTokens), used as given: its special tokens are the caller's.
    `between_batches()` is called before each forward pass."""
    if not texts:
        return np.zeros((0, enc.dims), dtype=np.float32), []
    given = {i: t for i, t in enumerate(texts) if isinstance(t, (list, tuple))}
    strings = [t for t in texts if not isinstance(t, (list, tuple))]
    _check_texts(strings)
    ids, types = _tokenize(enc, strings) if strings else ([], None)
    ids, types = list(ids), None if types is None else list(types)
    for i, tokens in given.items():
        tokens = [int(x) for x in tokens][: enc.max_length]
        if not tokens or min(tokens) < 0 or max(tokens) >= enc.model.args.vocab_size:
            raise InvalidInput(
                f"token ids must be a non-empty list in [0, {enc.model.args.vocab_size})"
            )
        ids.insert(i, tokens)
        if types is not None:
            types.insert(i, [0] * len(tokens))
    out = np.zeros((len(ids), enc.dims), dtype=np.float32)
    for group in _groups([len(t) for t in ids]):
        if between_batches is not None:
            between_batches()
        hidden, mask = _forward(
            enc, [ids[i] for i in group], None if types is None else [types[i] for i in group]
        )
        pooled = pool(hidden, mask, enc.pooling, enc.normalize)
        out[group] = np.array(pooled)
    return out, [len(t) for t in ids]


def score_pairs(enc: Encoder, query: str, docs: list, between_batches=None) -> tuple:
    """Cross-encoder relevance of each doc to query: float32 [B] (sigmoid of the logit for one
    label, softmax probability of label 1 for two) and each pair's token count.
    `between_batches()` is called before each forward pass."""
    if enc.num_labels == 0:
        raise InvalidInput(
            f"{enc.path.name} has no sequence-classification head; reranking needs a cross-encoder"
        )
    if enc.num_labels not in (1, 2):
        raise InvalidInput(
            f"a cross-encoder with {enc.num_labels} labels cannot score relevance (1 or 2)"
        )
    _check_texts([query], "the query")
    _check_texts(docs, "documents")
    if not docs:
        return np.zeros(0, dtype=np.float32), []
    ids, types = _tokenize(enc, [query] * len(docs), list(docs))
    out = np.zeros(len(ids), dtype=np.float32)
    for group in _groups([len(t) for t in ids]):
        if between_batches is not None:
            between_batches()
        hidden, _ = _forward(
            enc, [ids[i] for i in group], None if types is None else [types[i] for i in group]
        )
        logits = enc.model.classify(hidden).astype(mx.float32)
        if enc.num_labels == 1:
            scores = mx.sigmoid(logits[:, 0])
        else:
            scores = mx.softmax(logits, axis=-1)[:, 1]
        out[group] = np.array(scores)
    return out, [len(t) for t in ids]

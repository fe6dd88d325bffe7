"""Perplexity of a model on a text (the optional `perplexity_text` metric of quantization jobs).

The text is tokenized by the model's own tokenizer and cut to MAX_TOKENS; perplexity is
exp(mean negative log-likelihood of each token given the ones before it), evaluated in windows
of WINDOW tokens. MLX models run on the MLX worker; GGUF files through llama-cpp-python."""

import hashlib
import math
from collections import OrderedDict
from pathlib import Path

from mlxbackend.text.models import load_model_dir

MAX_TOKENS = 2048
WINDOW = 512
_BASE = OrderedDict()  # (model folder fingerprint, text digest) → perplexity, most recent last
_BASE_KEEP = 16


def base_perplexity(model_dir: Path, text: str) -> float:
    """mlx_perplexity of an unquantized model, remembered while its files are unchanged: several
    jobs from one base (q4, q8, GGUF types) measure it once."""
    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    stamp = tuple((p.name, st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    key = (
        str(folder.resolve()),
        stamp,
        hashlib.sha256(text.encode()).hexdigest(),
        MAX_TOKENS,
        WINDOW,
    )
    if key not in _BASE:
        _BASE[key] = mlx_perplexity(folder, text)
        while len(_BASE) > _BASE_KEEP:
            _BASE.popitem(last=False)
    _BASE.move_to_end(key)
    return _BASE[key]


def mlx_perplexity(model_dir: Path, text: str) -> float:
    import mlx.core as mx
    import mlx.nn as nn

    model, tokenizer, _ = load_model_dir(Path(model_dir))
    ids = tokenizer.encode(text)[:MAX_TOKENS]
    if len(ids) < 2:
        raise ValueError("perplexity_text is too short (fewer than 2 tokens)")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, WINDOW):
        chunk = ids[start : start + WINDOW + 1]
        if len(chunk) < 2:
            break
        x = mx.array(chunk)[None]
        logits = model(x[:, :-1]).astype(mx.float32)
        nll = nn.losses.cross_entropy(logits, x[:, 1:], reduction="sum")
        total += nll.item()
        count += len(chunk) - 1
    return math.exp(total / count)


def gguf_perplexity(gguf_file: Path, text: str) -> float:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        n_ctx=WINDOW + 1,
        logits_all=True,
        verbose=False,
        n_threads=max(1, min(4, __import__("os").cpu_count() or 1)),
    )
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)[:MAX_TOKENS]
        if len(ids) < 2:
            raise ValueError("perplexity_text is too short (fewer than 2 tokens)")
        total, count = 0.0, 0
        for start in range(0, len(ids) - 1, WINDOW):
            chunk = ids[start : start + WINDOW + 1]
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk[:-1])
            logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
            logits -= logits.max(axis=-1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
            total -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
            count += len(chunk) - 1
        return math.exp(total / count)
    finally:
        llm.close()

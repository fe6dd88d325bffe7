"""Request sampling parameters → an mlx-lm-style sampler (own RNG key) and logits processors."""

import json
from dataclasses import dataclass

from mlxbackend.errors import InvalidInput


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 0.0
    repeat_last_n: int = 0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: str = ""
    seed: int = 0
    ignore_eos: bool = False


DEFAULT_PENALTY_WINDOW = 64


def validate(p: SamplingParams):
    if p.temperature < 0:
        raise InvalidInput(f"Temperature must be >= 0, got {p.temperature}")
    if p.top_k < 0:
        raise InvalidInput(f"TopK must be >= 0, got {p.top_k}")
    if not 0 <= p.top_p <= 1 and p.top_p != 0:
        raise InvalidInput(f"TopP must be in [0, 1], got {p.top_p}")
    if not 0 <= p.min_p <= 1:
        raise InvalidInput(f"MinP must be in [0, 1], got {p.min_p}")
    if p.repeat_penalty < 0:
        raise InvalidInput(f"Penalty (repeat penalty) must be >= 0, got {p.repeat_penalty}")
    parse_logit_bias(p.logit_bias, None)


def parse_logit_bias(text: str, vocab_size) -> dict:
    """LogitBias JSON {"token id": bias} → {int: float}."""
    if not text.strip():
        return {}
    try:
        raw = json.loads(text)
        bias = {int(k): float(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError):
        raise InvalidInput(
            f"LogitBias must be a JSON object of token id → bias, got {text[:200]!r}"
        ) from None
    if vocab_size is not None:
        bad = [k for k in bias if not 0 <= k < vocab_size]
        if bad:
            raise InvalidInput(f"LogitBias token ids out of range [0, {vocab_size}): {bad[:5]}")
    return bias


def make_sampler(p: SamplingParams, vocab_size: int):
    """Greedy at temperature 0; else top-k → top-p → min-p, then a categorical draw from a
    per-request key, so a seed gives the same tokens whatever else runs."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if p.temperature <= 0:
        return greedy_sampler
    methods = []
    if 0 < p.top_k < vocab_size:
        methods.append(lambda x: apply_top_k(x, p.top_k))
    if 0 < p.top_p < 1:
        methods.append(lambda x: apply_top_p(x, p.top_p))
    if p.min_p > 0:
        methods.append(lambda x: apply_min_p(x, p.min_p))
    state = {"key": mx.random.key(p.seed & 0xFFFFFFFF)}
    inv_temp = 1.0 / p.temperature

    def sampler(logprobs):
        for method in methods:
            logprobs = method(logprobs)
        state["key"], sub = mx.random.split(state["key"])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sampler


def make_processors(p: SamplingParams, vocab_size: int, eos_ids, constraint=None):
    """Logit bias, repeat/presence/frequency penalties (mlx-lm's), IgnoreEOS, and a grammar
    constraint last, so that nothing re-allows a token the grammar forbids."""
    import mlx.core as mx
    from mlx_lm.sample_utils import make_logits_processors

    window = p.repeat_last_n if p.repeat_last_n > 0 else DEFAULT_PENALTY_WINDOW
    processors = make_logits_processors(
        logit_bias=parse_logit_bias(p.logit_bias, vocab_size) or None,
        repetition_penalty=p.repeat_penalty if p.repeat_penalty not in (0, 1) else None,
        repetition_context_size=window,
        presence_penalty=p.presence_penalty or None,
        presence_context_size=window,
        frequency_penalty=p.frequency_penalty or None,
        frequency_context_size=window,
    )
    if p.ignore_eos and eos_ids:
        eos = mx.array(sorted(eos_ids))

        def block_eos(_, logits):
            return logits.at[:, eos].add(-mx.inf)

        processors.append(block_eos)
    if constraint is not None:
        processors.append(constraint.processor)
    return processors

"""Request sampling parameters → an mlx-lm-style sampler (own RNG key) and logits processors."""

import json
from dataclasses import dataclass

from mlxbackend.errors import InvalidInput
from mlxbackend.options import number_option


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
    typical_p: float = 0.0  # 0 or 1 = off (LocalAI sends 1)
    tail_free_z: float = 0.0  # 0 or 1 = off (LocalAI sends 1)
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    mirostat: int = 0  # 0 = off, 1 or 2 = llama.cpp's Mirostat versions
    mirostat_tau: float = 0.0  # 0 = llama.cpp's 5.0 (make_sampler)
    mirostat_eta: float = 0.0  # 0 = llama.cpp's 0.1


DEFAULT_PENALTY_WINDOW = 64

# Options keys → SamplingParams field and type (LocalAI's mlx backend reads temp/temperature,
# top_p, top_k, min_p, xtc_* and seed).
# A request field left at 0 takes the Options value; xtc_* have no request field.
OPTION_KEYS = {
    "temperature": ("temperature", float),
    "temp": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "min_p": ("min_p", float),
    "xtc_probability": ("xtc_probability", float),
    "xtc_threshold": ("xtc_threshold", float),
    "seed": ("seed", int),
    "typical_p": ("typical_p", float),
    "mirostat": ("mirostat", int),
    "mirostat_tau": ("mirostat_tau", float),
    "mirostat_eta": ("mirostat_eta", float),
}
ALWAYS_FROM_OPTIONS = {"xtc_probability", "xtc_threshold"}


def with_option_defaults(p: SamplingParams, options: dict) -> SamplingParams:
    """Fill the fields a request left at 0 from the model's Options (their defaults)."""
    for key, (name, kind) in OPTION_KEYS.items():
        value = number_option(options, key, kind)
        if value is not None and (name in ALWAYS_FROM_OPTIONS or not getattr(p, name)):
            setattr(p, name, value)
    return p


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
    if p.typical_p < 0:
        raise InvalidInput(f"TypicalP must be in (0, 1] (0 or 1 = off), got {p.typical_p}")
    if p.tail_free_z < 0:
        raise InvalidInput(
            f"TailFreeSamplingZ must be in (0, 1] (0 or 1 = off), got {p.tail_free_z}"
        )
    if not 0 <= p.xtc_probability <= 1:
        raise InvalidInput(f"xtc_probability must be in [0, 1], got {p.xtc_probability}")
    if not 0 <= p.xtc_threshold <= 0.5:
        raise InvalidInput(f"xtc_threshold must be in [0, 0.5], got {p.xtc_threshold}")
    if p.mirostat not in (0, 1, 2):
        raise InvalidInput(f"Mirostat must be 0 (off), 1 or 2, got {p.mirostat}")
    if p.mirostat_tau < 0 or p.mirostat_eta < 0:
        raise InvalidInput(
            f"MirostatTAU and MirostatETA must be >= 0 (0 = llama.cpp's 5.0 and 0.1), got "
            f"{p.mirostat_tau} and {p.mirostat_eta}"
        )
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


class PositionalSampler:
    """A sampler whose draw for the n-th reply token uses a key derived from (seed, n) alone, so a
    seed reproduces the reply whatever else runs and however the tokens were batched: with
    speculative decoding (text/speculate.py) the verifier sets `position` back to the first
    token it samples, draws one position after another, and keeps the same tokens as plain
    decoding would. `draw(logprobs, key)` is the truncation chain and the categorical draw."""

    def __init__(self, seed: int, draw):
        self.seed = seed & 0xFFFFFFFF
        self.draw = draw
        self.position = 0

    def key(self):
        import mlx.core as mx

        key = mx.random.key((self.seed << 32) | (self.position & 0xFFFFFFFF))
        self.position += 1
        return key

    def __call__(self, logprobs):
        return self.draw(logprobs, self.key())


def make_sampler(p: SamplingParams, vocab_size: int, special_ids=()):
    """Greedy at temperature 0; else Mirostat when asked (it replaces the truncation chain, as
    in llama.cpp), or top-k → tail-free → typical → top-p → min-p → XTC, then a categorical
    draw keyed by (seed, token position) (`PositionalSampler`).
    `special_ids` (EOS, newline) are never dropped by XTC, as in mlx-lm's server."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    from mlxbackend.text import samplers

    if p.temperature <= 0:
        return greedy_sampler
    inv_temp = 1.0 / p.temperature

    if p.mirostat:  # mu moves token by token: never speculative (generate.refuse_unhonoured)
        tau, eta = p.mirostat_tau or 5.0, p.mirostat_eta or 0.1  # 0 = llama.cpp's defaults
        mu = {"value": mx.array([2.0 * tau])}  # llama.cpp's starting mu

        def mirostat(logprobs, key):
            m = mx.broadcast_to(mu["value"][:1], logprobs.shape[:1])
            token, mu["value"] = samplers.mirostat_step(
                logprobs * inv_temp, m, p.mirostat, tau, eta, key
            )
            return token

        return PositionalSampler(p.seed, mirostat)
    special = mx.array(sorted(set(special_ids)), dtype=mx.int32)
    methods = []
    if 0 < p.top_k < vocab_size:
        methods.append(lambda x, _: apply_top_k(x, p.top_k))
    if 0 < p.tail_free_z < 1:
        methods.append(lambda x, _: samplers.apply_tail_free(x, p.tail_free_z))
    if 0 < p.typical_p < 1:
        methods.append(lambda x, _: samplers.apply_typical(x, p.typical_p))
    if 0 < p.top_p < 1:
        methods.append(lambda x, _: apply_top_p(x, p.top_p))
    if p.min_p > 0:
        methods.append(lambda x, _: apply_min_p(x, p.min_p))
    if p.xtc_probability > 0:
        methods.append(
            lambda x, key: samplers.apply_xtc(x, p.xtc_probability, p.xtc_threshold, special, key)
        )

    def draw(logprobs, key):
        xtc_key, key = mx.random.split(key)
        for method in methods:
            logprobs = method(logprobs, xtc_key)
        return mx.random.categorical(logprobs * inv_temp, key=key)

    return PositionalSampler(p.seed, draw)


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

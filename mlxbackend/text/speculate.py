"""Speculative decoding without a second model: prompt lookup (n-gram) drafts, their adaptive
length, and the acceptance rule shared with `DraftModel` drafts.

A request's drafts continue the most recent earlier occurrence, in its prompt or its reply so
far, of the last few tokens (the longest n-gram first). The target model verifies them in one
forward pass; each position is sampled exactly as plain decoding would sample it (same
processors, same positional key, text/sampling.py), and drafts are kept while they equal those
samples. With a deterministic draft that is standard speculative sampling (accept d with
probability p(d); on rejection the token is drawn from p without d), so the reply has the
target's distribution; here it is even the same reply, token for token, as without speculation.
"""

from dataclasses import dataclass

from mlxbackend.errors import InvalidInput
from mlxbackend.options import flag_option, number_option

DEFAULT_MAX_DRAFT = 8  # drafts per step at most (prompt lookup); the length adapts below it
DEFAULT_NGRAM = (2, 3)  # n-gram sizes searched, longest first (HF's prompt lookup uses 1-2)
DEFAULT_DRAFT_MODEL_TOKENS = 3  # a DraftModel's drafts per step when NDraft is 0


@dataclass
class SpecConfig:
    """How one model speculates (Options, see README "Speculative decoding")."""

    lookup: bool = True  # prompt lookup on (Options prompt_lookup)
    max_draft: int = DEFAULT_MAX_DRAFT  # Options prompt_lookup_max
    min_ngram: int = DEFAULT_NGRAM[0]  # Options prompt_lookup_min_ngram
    max_ngram: int = DEFAULT_NGRAM[1]  # Options prompt_lookup_ngram
    step_tokens: int = 0  # tokens one verification pass takes in all (0 = measured at load)


def spec_config(options: dict) -> SpecConfig:
    """Options prompt_lookup (default on), prompt_lookup_max, prompt_lookup_ngram,
    prompt_lookup_min_ngram, spec_step_tokens."""
    c = SpecConfig()
    lookup = flag_option(options, "prompt_lookup")
    if lookup is not None:
        c.lookup = lookup
    for key, name in (
        ("prompt_lookup_max", "max_draft"),
        ("prompt_lookup_ngram", "max_ngram"),
        ("prompt_lookup_min_ngram", "min_ngram"),
        ("spec_step_tokens", "step_tokens"),
    ):
        value = number_option(options, key, int)
        if value is not None:
            setattr(c, name, value)
    if c.max_draft < 1 or not 1 <= c.min_ngram <= c.max_ngram or c.step_tokens < 0:
        raise InvalidInput(
            f"speculation Options: prompt_lookup_max ({c.max_draft}) must be >= 1, "
            f"1 <= prompt_lookup_min_ngram ({c.min_ngram}) <= prompt_lookup_ngram "
            f"({c.max_ngram}), spec_step_tokens ({c.step_tokens}) >= 0"
        )
    return c


def measure_step_tokens(model, ratio: float = 1.5, limit: int = 128, context: int = 64) -> int:
    """How wide a batch's verification pass may be before it costs more than it saves: the most
    tokens one forward pass takes for at most `ratio` × the time of 8 (from 8 up in powers of
    two, after `context` tokens, the fastest of three runs per size; below 8 tokens matrix-vector
    kernels make the times noisy). Decoding on a Mac's GPU is bound by reading the weights up to
    dozens of tokens per pass, on a 2-core CPU by compute after a few (README "Speculative
    decoding")."""
    import time

    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.zeros((1, context), dtype=mx.uint32), cache=cache)
    mx.eval([c.state for c in cache])

    def seconds(n: int) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            mx.eval(model(mx.zeros((1, n), dtype=mx.uint32), cache=cache))
            best = min(best, time.perf_counter() - start)
            for c in cache:
                c.trim(n)
        return best

    seconds(8)  # warm-up
    base, width = seconds(8), 8
    while width * 2 <= limit and seconds(width * 2) <= ratio * base:
        width *= 2
    mx.clear_cache()
    return width


class NgramIndex:
    """Where each n-gram of a token sequence last continued: proposes drafts in O(n) per token.

    `tokens` is the request's prompt and reply so far; `extend` appends tokens and indexes the
    n-grams that now have a continuation."""

    def __init__(self, tokens: list, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list = []
        self.after: dict = {}  # n-gram tuple -> index of the token that last followed it
        self.extend(tokens)

    def extend(self, tokens) -> None:
        seq = self.tokens
        for t in tokens:
            end = len(seq)  # the new token's index: every n-gram ending before it continues here
            for n in range(1, self.max_n + 1):  # every size: free slots take shorter matches
                if end >= n:
                    self.after[tuple(seq[end - n : end])] = end
            seq.append(t)

    def propose(self, k: int, min_n: int | None = None) -> list:
        """Up to `k` tokens that followed the longest recent n-gram equal to the sequence's end
        (n-grams down to `min_n`, default the index's own)."""
        seq = self.tokens
        for n in range(self.max_n, (min_n or self.min_n) - 1, -1):
            if len(seq) <= n:
                continue
            at = self.after.get(tuple(seq[-n:]))
            if at is not None:
                return seq[at : at + k]
        return []


class DraftLength:
    """The number of drafts to ask for next, from the recent acceptance: doubled after a fully
    accepted draft, cut to one more than the accepted count otherwise. A request whose drafts
    keep failing pauses its lookups (`skip` steps, doubling up to 32) so plain chat does not pay
    for verification it never uses."""

    def __init__(self, max_draft: int, start: int = 4):
        self.max = max_draft
        self.k = min(start, max_draft)
        self.skip = 0  # steps left without drafting
        self.backoff = 1
        self.miss_backoff = 1
        self.drafted = 0
        self.accepted = 0
        self.kept = 0.0  # recent drafts kept, and positions tried (kept + rejections), decaying
        self.tried = 0.0

    def wanted(self) -> int:
        if self.skip:
            self.skip -= 1
            return 0
        return self.k

    def rate(self) -> float:
        """The recent chance that a draft position is kept (each position's keep is a coin
        flip until the first rejection), with a prior of one kept and one rejected."""
        return (self.kept + 1) / (self.tried + 2)

    def missed(self) -> None:
        """No draft was found: look again after 1, 2, 4, then every 8 steps while none is (a
        step that looks cannot overlap the next one's forward pass with this one's sampling)."""
        self.skip, self.miss_backoff = self.miss_backoff, min(8, self.miss_backoff * 2)

    def found(self) -> None:
        self.miss_backoff = 1

    def idle(self) -> None:
        """A step taken without asking (the whole batch was pausing)."""
        self.skip = max(0, self.skip - 1)

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.kept = 0.9 * self.kept + accepted
        self.tried = 0.9 * self.tried + accepted + (accepted < drafted)
        if accepted == drafted:
            self.k = min(self.max, self.k * 2)
            self.backoff = 1
        else:
            self.k = max(1, accepted + 1)
            if accepted == 0:
                self.skip, self.backoff = self.backoff, min(32, self.backoff * 2)


@dataclass
class SeqSpec:
    """One request's speculation state inside a batch (text/spec_batch.py)."""

    index: NgramIndex | None  # prompt lookup; None with a DraftModel
    length: DraftLength
    constraint: object = None  # its grammar (text/grammar.Constraint): drafts are cut to it
    draft_cache: list | None = None  # DraftModel: its KV of the same tokens as the target's


def accepted_count(drafts: list, sampled: list) -> int:
    """How many leading drafts equal the tokens sampled at their positions."""
    n = 0
    while n < len(drafts) and drafts[n] == sampled[n]:
        n += 1
    return n

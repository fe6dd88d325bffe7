"""Speculative decoding inside mlx-lm's continuous batch.

`SpecBatchGenerator` is mlx-lm's BatchGenerator with a generation batch (`SpecGenerationBatch`)
whose decode step lets each request propose its own drafts (text/speculate.py: prompt lookup)
and verifies them all in one batched forward pass of width 1 + the longest draft. Each request
keeps the drafts that equal its own samples at their positions; the others' KV entries are
left as holes the attention mask hides (`Ragged`), so requests that accept different numbers
of tokens stay in one batch. A step in which no request drafts is mlx-lm's own (pipelined) step.
Stops, max tokens, logits processors (penalties, grammar: drafts the grammar rejects are cut
before verification), logprobs and the positional sampler keys work as in plain decoding, so a
request's reply is the same token for token.
"""

import mlx.core as mx
import numpy as np
from mlx_lm.generate import BatchGenerator, GenerationBatch
from mlx_lm.models.cache import BatchKVCache

from mlxbackend.text.speculate import SeqSpec, accepted_count

EAGER_RATE = 0.3  # recent keep rate above which a pausing batch still drafts (`_eager`)


class HoleyKVCache(BatchKVCache):
    """mlx-lm's BatchKVCache whose rows may hold rejected drafts ("holes") that its attention
    mask hides; `ragged` (shared by a batch's layers) knows where they are."""

    ragged: "Ragged"

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        mask = super().make_mask(N, return_array=return_array, **kwargs)
        valid = self.ragged.valid
        if valid is None:
            return mask
        seen = mx.concatenate([valid[:, : self._idx], mx.ones((valid.shape[0], N), mx.bool_)], 1)
        return mask & seen[:, None, None, :]


class Ragged:
    """Rows of one batch's per-layer KV caches that keep different numbers of the entries a
    verification pass wrote. Dropping a row's rejected tail would mean moving all of its earlier
    entries (the rows of a BatchKVCache end together): instead every row is trimmed by the
    fewest rejected, and the rest of each row's rejected entries become holes — hidden by the
    mask, not counted in the row's RoPE offset — until holes fill a quarter of the cache, when
    the rows are gathered without them (`compact`; also before new rows join and when a row's
    KV is extracted)."""

    def __init__(self):
        self.valid = None  # (rows, entries) bool: False at holes; None = no holes

    def adopt(self, cache: list) -> None:
        """Make a batch's BatchKVCaches holey (mlx-lm builds plain ones for joining rows)."""
        for c in cache:
            if type(c) is BatchKVCache:
                c.__class__ = HoleyKVCache
            c.ragged = self

    def wrote(self, n: int) -> None:
        """A forward pass appended `n` entries to every row."""
        if self.valid is not None:
            self.valid = mx.concatenate(
                [self.valid, mx.ones((self.valid.shape[0], n), mx.bool_)], axis=1
            )

    def drop(self, cache: list, rejected: list) -> None:
        """Drop the last `rejected[i]` entries of row i in every layer."""
        low = min(rejected)
        extra = [r - low for r in rejected]
        for c in cache:
            if low:
                c.trim(low)
        end = cache[0]._idx
        if self.valid is not None:
            self.valid = self.valid[:, :end]
        if not any(extra):
            return
        holes = mx.array(extra)
        for c in cache:
            c.offset = c.offset - holes  # RoPE positions count kept entries only
        valid = self.valid if self.valid is not None else mx.ones((len(extra), end), mx.bool_)
        self.valid = valid & (mx.arange(end)[None] < (end - holes)[:, None])
        used = len(extra) * end - cache[0].left_padding.sum()
        if (~self.valid).sum().item() * 4 > used.item():
            self.compact(cache)

    def compact(self, cache: list) -> None:
        """Gather each row's kept entries, right-aligned as a BatchKVCache keeps them."""
        if self.valid is None:
            return
        end = cache[0]._idx
        padding = cache[0].left_padding.tolist()
        valid = np.array(self.valid[:, :end])
        rows = [np.flatnonzero(v[p:]) + p for v, p in zip(valid, padding, strict=True)]
        width = max(len(r) for r in rows)
        index = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            index[i, width - len(r) :] = r
        gather = mx.array(index)[:, None, :, None]
        for c in cache:
            c.keys = mx.take_along_axis(c.keys[..., :end, :], gather, axis=2)
            c.values = mx.take_along_axis(c.values[..., :end, :], gather, axis=2)
            c._idx = width
            c.left_padding = mx.array([width - len(r) for r in rows])
        self.valid = None

    def extract(self, cache: list, i: int) -> list:
        """Row i's KV as single-sequence caches, without holes (finished, removed)."""
        if self.valid is None:
            return [c.extract(i) for c in cache]
        from mlx_lm.models.cache import KVCache

        end, pad = cache[0]._idx, cache[0].left_padding.tolist()[i]
        keep = mx.array(np.flatnonzero(np.array(self.valid[i, pad:end])) + pad)
        out = []
        for c in cache:
            single = KVCache()
            single.keys = mx.contiguous(c.keys[i : i + 1, :, keep])
            single.values = mx.contiguous(c.values[i : i + 1, :, keep])
            single.offset = single.keys.shape[2]
            out.append(single)
        return out

    def filter(self, keep: list, shift: int) -> None:
        """Rows `keep` stay; BatchKVCache.filter cut `shift` entries of shared padding."""
        if self.valid is not None:
            self.valid = self.valid[mx.array(keep)][:, shift:] if keep else None


class SpecGenerationBatch(GenerationBatch):
    """mlx-lm's GenerationBatch plus speculative steps (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        self.specs: list = []  # SeqSpec or None per sequence, in batch order
        self.waiting: dict = {}  # uid -> SeqSpec for sequences not yet in this batch
        self.step_tokens = 0  # tokens a verification pass takes in all (0 = not known yet)
        self.calibrate = None  # () -> step_tokens, measured when first needed
        self.draft = None  # a DraftModel: every sequence drafts with it (SeqSpec.draft_cache)
        self.draft_cache: list = []  # its batch KV, rows as in this batch
        self.ragged = Ragged()  # holes of rejected drafts in prompt_cache
        self.draft_ragged = Ragged()  # and in draft_cache
        super().__init__(*args, **kwargs)

    def extend(self, batch):
        self.ragged.compact(self.prompt_cache)  # joining rows are padded to the others: no holes
        self.draft_ragged.compact(self.draft_cache)
        super().extend(batch)
        self.ragged.adopt(self.prompt_cache)
        specs = [self.waiting.pop(uid, None) for uid in batch.uids]
        self.specs.extend(specs)
        if self.draft is not None:
            from mlx_lm.generate import _extend_cache, _merge_caches

            joining = [s.draft_cache for s in specs]
            self.draft_cache = _extend_cache(self.draft_cache, _merge_caches(joining))
            self.draft_ragged.adopt(self.draft_cache)
            for s in specs:
                s.draft_cache = None  # merged: the batch holds it now

    def filter(self, keep):
        before = [c._idx if c is not None else 0 for c in self._first_layers()]
        super().filter(keep)
        self.specs = [self.specs[i] for i in keep]
        if not keep:
            self.draft_cache = []
        for c in self.draft_cache:
            c.filter(keep)
        after = [c._idx if c is not None else 0 for c in self._first_layers()]
        self.ragged.filter(keep, before[0] - after[0])
        self.draft_ragged.filter(keep, before[1] - after[1])

    def _first_layers(self) -> tuple:
        first = self.prompt_cache[0] if self.prompt_cache else None
        return first, self.draft_cache[0] if self.draft_cache else None

    def extract_cache(self, idx: int) -> list:
        return self.ragged.extract(self.prompt_cache, idx)

    def _plain_cache(self) -> bool:
        return bool(self.prompt_cache) and all(
            type(c) in (BatchKVCache, HoleyKVCache) for c in self.prompt_cache
        )

    def _can_speculate(self) -> bool:
        if self.draft is not None:
            return self._plain_cache()  # the draft must see every token: speculate every step
        return (
            (any(s is not None and s.length.skip == 0 for s in self.specs) or self._eager())
            and self._width() > 0
            and self._plain_cache()
        )

    def _eager(self) -> bool:
        """Whether a batch whose requests all pause drafting still verifies a free draft for
        each: with two or more requests a pass one token wider costs ~15 % more on this CPU
        (less on a GPU), and drafts that are kept often enough pay for it."""
        rates = [s.length.rate() for s in self.specs if s is not None and s.index is not None]
        return len(self.uids) >= 2 and bool(rates) and sum(rates) / len(rates) >= EAGER_RATE

    def _width(self) -> int:
        """Drafts per sequence this step at most: the verification pass (every sequence's
        pending token and drafts, padded to the longest) stays within `step_tokens`."""
        if len(self.uids) < 2:
            return 1 << 30  # one sequence: its own draft length decides
        if not self.step_tokens and self.calibrate is not None:
            self.step_tokens = self.calibrate()
        if not self.step_tokens:
            return 1 << 30
        return max(0, self.step_tokens // len(self.uids) - 1)

    def _wanted(self, i: int, spec, width: int) -> int:
        """Drafts sequence i may take this step: its adaptive length, its token budget, the
        batch's width."""
        if spec is None:
            return 0
        left = self.max_tokens[i] - self._num_tokens[i] - 1
        return max(0, min(spec.length.wanted(), left, width))

    def _cut(self, i: int, spec, pending: int, drafts: list) -> list:
        """Drafts the sequence's grammar rejects are cut before verification."""
        if drafts and spec.constraint is not None:
            history = self.tokens[i] + [pending]
            return drafts[: spec.constraint.valid_drafts(history, drafts)]
        return drafts

    def _propose(self, pending: list) -> list:
        """Each sequence's prompt-lookup drafts after its pending token."""
        width = self._width()
        out = []
        for i, spec in enumerate(self.specs):
            drafts = []
            if spec is not None:
                spec.index.extend([pending[i]])
                k = self._wanted(i, spec, width)
                found = spec.index.propose(k) if k else []
                if k and not found:
                    spec.length.missed()
                elif found:
                    spec.length.found()
                drafts = self._cut(i, spec, pending[i], found)
            out.append(drafts)
        return self._fill(pending, out, int(not any(out) and self._eager()))

    def _fill(self, pending: list, drafts: list, at_least: int = 0) -> list:
        """The verification pass is as wide as the longest draft for every sequence: a shorter
        row's slots cost the same filled or padded, so they take the longest lookup match there
        is (single tokens included, pauses ignored). Their outcome counts as any draft's.
        `at_least`: the width when no request drafted (an eager batch, `_eager`)."""
        width = max([at_least, *map(len, drafts)])
        if not width:
            return drafts
        for i, spec in enumerate(self.specs):
            have = drafts[i]
            left = self.max_tokens[i] - self._num_tokens[i] - 1
            want = min(width, left)
            if spec is None or len(have) >= want:
                continue
            more = spec.index.propose(want, min_n=None if have else 1)
            if more[: len(have)] == have:  # the same match, continued (the grammar cuts again)
                drafts[i] = self._cut(i, spec, pending[i], more)
        return drafts

    def _draft_model(self, pending: list) -> tuple[list, int]:
        """Each sequence's greedy drafts from the DraftModel, batched: it reads the pending
        tokens, drafts as many tokens as the longest request wants, then reads the last draft
        too, so that its cache holds the same tokens as the target's after verification.
        Returns (drafts per sequence, entries added to the draft cache)."""
        width = self._width()
        wanted = [self._wanted(i, spec, width) for i, spec in enumerate(self.specs)]
        x = mx.array(pending, dtype=mx.uint32)[:, None]
        proposed = []
        for _ in range(max(wanted)):
            x = mx.argmax(self.draft(x, cache=self.draft_cache)[:, -1, :], axis=-1)[:, None]
            self.draft_ragged.wrote(1)
            proposed.append(x)
        self.draft(x, cache=self.draft_cache)
        self.draft_ragged.wrote(1)
        mx.eval(proposed, [c.state for c in self.draft_cache])
        columns = mx.concatenate(proposed, axis=1).tolist() if proposed else [[]] * len(pending)
        drafts = [
            self._cut(i, spec, pending[i], row[: wanted[i]]) if spec is not None else []
            for i, (spec, row) in enumerate(zip(self.specs, columns, strict=True))
        ]
        return drafts, 1 + max(wanted)

    def _step(self):
        if not self._can_speculate():
            self._drop_draft()
            for spec in self.specs:
                if spec is not None:
                    spec.length.idle()
            tokens, logprobs = super()._step()
            self.ragged.wrote(1)
            self._index_fed(tokens)
            return [[t] for t in tokens], [[lp] for lp in logprobs]
        mx.eval(self._next_tokens)
        pending = self._next_tokens.tolist()
        if self.draft is not None:
            drafts, fed = self._draft_model(pending)
        else:
            drafts, fed = self._propose(pending), 0
        if not any(drafts):
            if fed > 1:
                self.draft_ragged.drop(self.draft_cache, [fed - 1] * len(pending))
            self._next_tokens = mx.array(pending, dtype=self._next_tokens.dtype)
            tokens, logprobs = super()._step()
            self.ragged.wrote(1)
            return [[t] for t in tokens], [[lp] for lp in logprobs]
        return self._verify(pending, drafts, fed)

    def _drop_draft(self) -> None:
        """A batch whose KV cannot be rewound (quantized, rotating) decodes plainly: its draft
        would fall behind, so it is dropped for good."""
        if self.draft is not None:
            self.draft, self.draft_cache = None, []

    def _index_fed(self, tokens: list) -> None:
        for spec, t in zip(self.specs, tokens, strict=True):
            if spec is not None and spec.index is not None:
                spec.index.extend([t])

    def _verify(self, pending: list, drafts: list, draft_fed: int = 0):
        """One forward pass over each sequence's pending token and drafts; keep what matches.
        `draft_fed`: entries the DraftModel's cache took this step (rewound to match)."""
        width = 1 + max(len(d) for d in drafts)
        rows = [[p, *d] + [0] * (width - 1 - len(d)) for p, d in zip(pending, drafts, strict=True)]
        inputs = mx.array(rows, dtype=mx.uint32)
        logits = self.model(inputs, cache=self.prompt_cache)
        self.ragged.wrote(width)

        sampled, logprobs, contexts = [], [], []
        for i, row in enumerate(rows):
            n = 1 + len(drafts[i])
            processors = self.logits_processors[i] or ()
            sampler = self.samplers[i] if self.samplers else self.fallback_sampler
            start = getattr(sampler, "position", None)
            toks, lps = [], []
            buffer = self._token_context[i]
            base = buffer._size
            for j in range(n):
                x = logits[i : i + 1, j]
                if processors:
                    context = buffer.update_and_fetch(mx.array(row[j : j + 1]))
                    contexts.append(context)
                    for processor in processors:
                        x = processor(context, x)
                lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
                toks.append(sampler(lp))
                lps.append(lp[0])
            buffer._size = base  # set to what was kept, below
            sampled.append((toks, start, base))
            logprobs.append(lps)
        mx.eval([t for toks, _, _ in sampled for t in toks], logprobs, contexts)

        reported, reported_lps, kept_counts, next_tokens, next_lps = [], [], [], [], []
        for i, (toks, start, base) in enumerate(sampled):
            values = [int(t.item()) for t in toks]
            n = accepted_count(drafts[i], values)
            spec = self.specs[i]
            if spec is not None:
                spec.length.update(len(drafts[i]), n)
                if spec.index is not None:
                    spec.index.extend(drafts[i][:n])
            kept = [pending[i], *drafts[i][:n]]
            if self.logits_processors[i]:
                self._token_context[i]._size = base + len(kept)
            sampler = self.samplers[i] if self.samplers else self.fallback_sampler
            if start is not None:
                sampler.position = start + n + 1
            self.tokens[i].extend(kept)
            reported.append(kept)
            reported_lps.append([self._next_logprobs[i], *logprobs[i][:n]])
            kept_counts.append(len(kept))
            next_tokens.append(values[n])
            next_lps.append(logprobs[i][n])
        self.ragged.drop(self.prompt_cache, [width - k for k in kept_counts])
        if draft_fed:
            self.draft_ragged.drop(self.draft_cache, [draft_fed - k for k in kept_counts])
        self._next_tokens = mx.array(next_tokens, dtype=mx.uint32)
        self._next_logprobs = next_lps
        return reported, reported_lps

    def next(self):
        if not self.uids:
            return []
        tokens, logprobs = self._step()
        keep, responses = [], []
        for i, uid in enumerate(self.uids):
            finish = None
            for token, lp in zip(tokens[i], logprobs[i], strict=True):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish = "length"
                if self._matchers[i].advance(token):
                    finish = "stop"
                responses.append(
                    self.Response(
                        uid=uid,
                        token=token,
                        logprobs=lp,
                        finish_reason=finish,
                        prompt_cache=self.extract_cache(i) if finish else None,
                        all_tokens=self.tokens[i] if finish else None,
                    )
                )
                if finish:
                    break
            if finish is None:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses


class SpecBatchGenerator(BatchGenerator):
    """mlx-lm's BatchGenerator whose generation batch speculates (`SpecGenerationBatch`)."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self._generation_batch = SpecGenerationBatch.empty(self.model, self.sampler)

    @property
    def generation(self) -> SpecGenerationBatch:
        return self._generation_batch

    def speculate(self, uid: int, spec: SeqSpec) -> None:
        """Give sequence `uid` (inserted, not yet generating) its speculation state."""
        self._generation_batch.waiting[uid] = spec

    def remove(self, uids, return_prompt_caches=False):
        for uid in uids:
            self._generation_batch.waiting.pop(uid, None)
        return super().remove(uids, return_prompt_caches)

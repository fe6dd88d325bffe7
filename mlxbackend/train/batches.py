"""Deterministic batches: micro-batch k of a run is a pure function of (data, batch size, seed),
so a resumed run sees exactly the batches the interrupted one would have.

Rows are grouped by length (as mlx-lm's iterate_batches does) and the groups are shuffled per
epoch with a generator seeded by (seed, epoch). Padding and masks follow mlx-lm."""

from dataclasses import dataclass, field

import numpy as np

PAD_TO = 32


@dataclass
class BatchPlan:
    examples: list  # SFT: (tokens, offset); preference: (prompt, chosen, rejected)
    batch_size: int
    max_seq_length: int
    seed: int
    preference: bool = False
    reference: object = None  # preference: np.ndarray [n, 2] reference log-probs (DPO)
    groups: list = field(init=False)
    _orders: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        order = sorted(range(len(self.examples)), key=self._length)
        bs = self.batch_size
        # The remainder forms a last, smaller batch: every row is trained on in every epoch.
        self.groups = [order[i : i + bs] for i in range(0, len(order), bs)]

    def _length(self, i: int) -> int:
        ex = self.examples[i]
        return len(ex[0]) + max(len(ex[1]), len(ex[2])) if self.preference else len(ex[0])

    def __len__(self) -> int:
        """Micro-batches per epoch."""
        return len(self.groups)

    def _order(self, epoch: int):
        if epoch not in self._orders:
            self._orders = {
                epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
            }
        return self._orders[epoch]

    def batch(self, k: int) -> tuple:
        """Micro-batch k (0-based, counted over all epochs) as model inputs."""
        epoch, pos = divmod(k, len(self.groups))
        rows = self.groups[self._order(epoch)[pos]]
        if self.preference:
            return self._preference_batch(rows)
        return collate([self.examples[i] for i in rows], self.max_seq_length)

    def _preference_batch(self, rows) -> tuple:
        import mlx.core as mx

        pairs = [self.examples[i] for i in rows]
        seqs = [(p + c, len(p)) for p, c, _ in pairs] + [(p + r, len(p)) for p, _, r in pairs]
        inputs, lengths = collate(seqs, self.max_seq_length)
        if self.reference is None:
            return inputs, lengths
        return inputs, lengths, mx.array(self.reference[rows].astype(np.float32))

    def all_batches(self):
        """Every micro-batch once, in length order (evaluation)."""
        for k in range(len(self.groups)):
            rows = self.groups[k]
            if self.preference:
                yield self._preference_batch(rows)
            else:
                yield collate([self.examples[i] for i in rows], self.max_seq_length)


def collate(rows: list, max_seq_length: int) -> tuple:
    """(tokens, offset) rows → (int32 [B, L] padded tokens, [B, 2] (offset, length)), as mlx-lm."""
    import mlx.core as mx

    lengths = [min(len(tokens), max_seq_length) for tokens, _ in rows]
    width = min(1 + PAD_TO * ((max(lengths) + PAD_TO - 1) // PAD_TO), max_seq_length)
    arr = np.zeros((len(rows), width), np.int32)
    for j, (tokens, _) in enumerate(rows):
        arr[j, : lengths[j]] = tokens[: lengths[j]]
    spans = [(offset, length) for (_, offset), length in zip(rows, lengths, strict=True)]
    return mx.array(arr), mx.array(spans)

"""Training losses. SFT is mlx-lm's own `default_loss`; DPO and ORPO (which mlx-lm lacks) are
written here on the same (inputs, lengths) batch layout: a preference batch holds the B chosen
sequences, then the B rejected ones, each masked to its completion."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn


def sequence_logps(model, inputs, lengths):
    """Per sequence: the summed log-probability of its completion tokens, and their count."""
    logits = model(inputs[:, :-1]).astype(mx.float32)
    targets = inputs[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    logp = -nn.losses.cross_entropy(logits, targets) * mask
    return logp.sum(axis=1), mask.sum(axis=1)


def dpo_loss(model, inputs, lengths, reference, beta: float = 0.1):
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid loss. `reference` holds the
    frozen starting model's (chosen, rejected) log-probs, computed once before training."""
    logps, counts = sequence_logps(model, inputs, lengths)
    chosen, rejected = mx.split(logps, 2)
    margin = (chosen - reference[:, 0]) - (rejected - reference[:, 1])
    loss = -nn.log_sigmoid(beta * margin).mean()
    return loss, counts.sum()


def orpo_loss(model, inputs, lengths, beta: float = 0.1):
    """Odds Ratio Preference Optimization (Hong et al. 2024): NLL on the chosen completion plus
    beta times the log-odds-ratio penalty; needs no reference model."""
    logps, counts = sequence_logps(model, inputs, lengths)
    mean_logps = logps / mx.maximum(counts, 1)
    chosen, rejected = mx.split(mean_logps, 2)
    chosen_n = mx.split(counts, 2)[0]

    def log_odds(lp):
        return lp - mx.log1p(-mx.minimum(mx.exp(lp), 1 - 1e-6))

    ratio = nn.log_sigmoid(log_odds(chosen) - log_odds(rejected))
    nll = -(chosen * chosen_n).sum() / mx.maximum(chosen_n.sum(), 1)
    return nll - beta * ratio.mean(), counts.sum()


def loss_for(method: str, beta: float):
    """The loss function for a training method."""
    from mlx_lm.tuner.trainer import default_loss

    if method == "dpo":
        return partial(dpo_loss, beta=beta)
    if method == "orpo":
        return partial(orpo_loss, beta=beta)
    return default_loss


def reference_logps(model, plan) -> "object":
    """DPO: the starting model's (chosen, rejected) log-probs for every pair, in eval mode."""
    import numpy as np

    out = np.zeros((len(plan.examples), 2), np.float32)
    for rows in plan.groups:
        inputs, lengths = plan._preference_batch(rows)[:2]
        logps, _ = sequence_logps(model, inputs, lengths)
        chosen, rejected = mx.split(logps, 2)
        mx.eval(chosen, rejected)
        out[rows, 0] = np.array(chosen)
        out[rows, 1] = np.array(rejected)
    return out

"""Training losses over the catalogue or over sampled negatives.

Every loss takes cell outputs (targets, hidden), the target item of each row and,
optionally, a (targets, items) mask of items that must not act as negatives (the items
the user has already seen; a row's own target is never masked). The losses:

- ``cross_entropy``: softmax over the full catalogue.
- ``sampled_cross_entropy``: softmax over the row's target, the other targets of the
  mini-batch and extra items drawn with probability proportional to popularity**alpha.
- ``bpr_max``: GRU4Rec's BPR-max over the same candidates: -log of the softmax-weighted
  mean of sigmoid(target score - negative score), plus a penalty on the weighted squared
  negative scores.

A negative equal to the row's target (an accidental hit) is masked, as are index 0 and
masked seen items.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from export.model import GRU4Rec

LOSSES = ("cross_entropy", "sampled_cross_entropy", "bpr_max")


class NegativeSampler:
    """Draws items with probability proportional to training popularity**alpha.

    Index 0 (unknown item) and items never seen in training are never drawn.
    """

    def __init__(self, item_counts: np.ndarray, alpha: float, generator: torch.Generator):
        weights = np.power(item_counts.astype(np.float64), alpha)
        weights[0] = 0.0
        if not weights.sum() > 0:
            raise ValueError("No item has a training interaction, so there is nothing to sample negatives from.")
        self.weights = torch.from_numpy(weights)
        self.generator = generator

    def sample(self, count: int) -> torch.Tensor:
        """Return ``count`` item indices drawn with replacement: (count,) int64."""
        return torch.multinomial(self.weights, count, replacement=True, generator=self.generator)


def compute_loss(
    name: str,
    model: GRU4Rec,
    outputs: torch.Tensor,  # (targets, hidden)
    targets: torch.Tensor,  # (targets,) int64
    seen: torch.Tensor | None = None,  # (targets, items) bool
    sampler: NegativeSampler | None = None,
    num_negatives: int = 0,
    bpr_max_regularization: float = 1.0,
) -> torch.Tensor:
    """Return the mean loss over the rows."""
    if name == "cross_entropy":
        logits = model.score(outputs)  # (targets, items)
        if seen is not None:
            logits = logits.masked_fill(seen, float("-inf"))
        return F.cross_entropy(logits, targets)
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; expected one of {', '.join(LOSSES)}.")

    candidates = targets
    if num_negatives:
        if sampler is None:
            raise ValueError(f"num_negatives={num_negatives} needs a negative sampler.")
        candidates = torch.cat([targets, sampler.sample(num_negatives)])  # (candidates,)
    logits = sampled_logits(model, outputs, candidates)  # (targets, candidates)
    negative_mask = _negative_mask(targets, candidates, seen)  # (targets, candidates)

    if name == "sampled_cross_entropy":
        # Column i of row i is the row's own target: the class to predict, so it stays unmasked.
        rows = torch.arange(len(targets))
        negative_mask[rows, rows] = False
        masked = logits.masked_fill(negative_mask, float("-inf"))
        return F.cross_entropy(masked, torch.arange(len(targets)))
    return bpr_max_loss(logits, negative_mask, bpr_max_regularization)


def sampled_logits(model: GRU4Rec, outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Score only the candidate items: (targets, candidates)."""
    weights = model.output_weights()[candidates]  # (candidates, width)
    return model.project_outputs(outputs) @ weights.T + model.output_bias[candidates]


def _negative_mask(targets: torch.Tensor, candidates: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
    """True where a candidate must not count as a negative of a row: (targets, candidates).

    The diagonal (each row's own target) is True too, because it is the positive.
    """
    mask = candidates[None, :] == targets[:, None]  # accidental hits and the diagonal
    mask |= (candidates == 0)[None, :]
    if seen is not None:
        mask |= seen[:, candidates]
    return mask


def bpr_max_loss(logits: torch.Tensor, negative_mask: torch.Tensor, regularization: float) -> torch.Tensor:
    """BPR-max over (targets, candidates) logits whose column i of row i is the positive."""
    rows = torch.arange(len(logits))
    positive = logits[rows, rows]  # (targets,)

    # A row whose candidates are all masked has no negative and adds no loss.
    has_negatives = ~negative_mask.all(dim=1)  # (targets,)
    if not has_negatives.any():
        return logits.sum() * 0.0

    # Softmax weights over the negatives only; masked candidates get weight 0.
    negative_logits = logits.masked_fill(negative_mask, float("-inf"))[has_negatives]  # (rows, candidates)
    weights = torch.softmax(negative_logits, dim=1)
    differences = positive[has_negatives, None] - logits[has_negatives]  # (rows, candidates)
    ranking = (weights * torch.sigmoid(differences)).sum(dim=1)  # (rows,)
    penalty = (weights * logits[has_negatives].masked_fill(negative_mask[has_negatives], 0.0) ** 2).sum(dim=1)
    return (-torch.log(ranking + 1e-24) + regularization * penalty).mean()

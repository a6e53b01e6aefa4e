"""Blend of ranking objectives, shared by the worker and the offline trade-off sweep.

The step graph returns C candidates per event, ranked by preference (the next-item
logit). When the model has a conversion head, it also returns for each candidate the
probability that an interaction with it is a strong one (purchase, add to cart, a high
rating). The worker
adds live item popularity and re-ranks the candidates by

    blend = w_preference * preference + w_conversion * conversion + w_popularity * popularity

where each term lies in [0, 1] within a user's candidates:

- preference = exp(logit - best logit): the candidate's next-item probability relative
  to the best candidate's, so the top preference candidate has 1;
- conversion = the head's probability as it is;
- popularity = decayed event count / the largest count among the candidates.

With weights (1, 0, 0) the order is the graph's own. Excluded candidates (logit -inf)
stay -inf whatever the weights. ``python -m export tradeoff`` calls the same function, so
offline figures describe what the worker publishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

OBJECTIVES = ("preference", "conversion", "popularity")


@dataclass(frozen=True)
class BlendWeights:
    preference: float = 1.0
    conversion: float = 0.0
    popularity: float = 0.0

    def __post_init__(self) -> None:
        for name in OBJECTIVES:
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"blend weight {name}={value} must be a finite number >= 0; use 0 to leave the objective out.")
        if self.preference + self.conversion + self.popularity <= 0:
            raise ValueError("invalid blend: every weight is 0; set at least one weight above 0.")

    @property
    def preference_only(self) -> bool:
        """True when the blend keeps the graph's order."""
        return self.conversion == 0 and self.popularity == 0

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in OBJECTIVES}


def blend_scores(
    logits: np.ndarray,  # (batch, C) preference logits; -inf marks excluded candidates
    weights: BlendWeights,
    conversion: np.ndarray | None = None,  # (batch, C) probabilities in [0, 1]
    popularity: np.ndarray | None = None,  # (batch, C) decayed counts >= 0
) -> np.ndarray:
    """Return the (batch, C) blended scores; higher is better, -inf where the logit is -inf."""
    logits = np.asarray(logits, dtype=np.float64)
    valid = np.isfinite(logits)
    best = np.max(np.where(valid, logits, -np.inf), axis=1, keepdims=True)  # (batch, 1)
    best = np.where(np.isfinite(best), best, 0.0)
    preference = np.where(valid, np.exp(np.where(valid, logits, best) - best), 0.0)
    blended = weights.preference * preference

    if weights.conversion:
        if conversion is None:
            raise ValueError("the blend weighs conversion, but the model has no conversion head; set the conversion weight to 0 or use a model with the head.")
        blended = blended + weights.conversion * np.asarray(conversion, dtype=np.float64)
    if weights.popularity and popularity is not None:
        counts = np.where(valid, np.asarray(popularity, dtype=np.float64), 0.0)
        top = counts.max(axis=1, keepdims=True)
        blended = blended + weights.popularity * np.divide(counts, top, out=np.zeros_like(counts), where=top > 0)
    return np.where(valid, blended, -np.inf)


def rank_candidates(scores: np.ndarray) -> np.ndarray:
    """Return each row's candidate positions, best first; ties keep the graph's order."""
    return np.argsort(-scores, axis=1, kind="stable")


def cap_per_category(
    order: Sequence[int],
    categories: Sequence[frozenset[str]],
    max_per_category: int,
    k: int,
) -> list[int]:
    """Pick up to k positions from ``order``, skipping any whose category already has max_per_category picks.

    ``categories[position]`` contains the candidate's categories; an item in several
    categories counts towards each, and an item with none is never capped.
    """
    picked: list[int] = []
    counts: dict[str, int] = {}
    for position in order:
        item_categories = categories[position]
        if any(counts.get(name, 0) >= max_per_category for name in item_categories):
            continue
        picked.append(position)
        for name in item_categories:
            counts[name] = counts.get(name, 0) + 1
        if len(picked) == k:
            break
    return picked


# Weight of one event of each type in live popularity. Event types outside this table
# (types a model manifest adds) count as a view.
DEFAULT_EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "rating": 4.0}
DEFAULT_HALF_LIFE_S = 86_400.0


def decay_factor(elapsed_ms: float | np.ndarray, half_life_s: float) -> float | np.ndarray:
    """Return the factor 2 ** (-elapsed / half-life) that ages a popularity count; elapsed below 0 counts as 0."""
    return np.exp2(-np.maximum(elapsed_ms, 0.0) / (half_life_s * 1000.0))

"""Offline sweep of ranking blends: what each mix of preference, conversion and popularity costs.

For every test user (the split and exclusions of ``python -m export evaluate``) the
bundle's PyTorch model gives the top-C candidates by preference, where C is the bundle's
graph width ``k``, and the conversion head gives their probabilities of a strong
interaction. Live popularity is what the worker would see at the user's test time: the
events of all users strictly before that time, each weighted by
``worker.ranking.DEFAULT_EVENT_WEIGHTS`` and aged by ``worker.ranking.decay_factor``.
Each blend of the grid re-ranks the candidates with ``worker.ranking.blend_scores``, the
function the worker calls, and is scored at K = 10 and 20:

- recall@K and ndcg@K of the test item;
- strong_precision@K: among users whose test item is in the top K, the share whose test
  interaction is strong (None when no user has a hit);
- coverage@K: share of known items in at least one user's top K;
- popularity_bias@K: mean training-popularity percentile (0 least, 1 most popular) of the
  recommended items.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.bundle import PytorchBundle
from export.evaluate import evaluation_case, evaluation_values, final_outputs, popularity_counts
from export.sequences import SplitDataset
from worker.ranking import (
    DEFAULT_EVENT_WEIGHTS,
    DEFAULT_HALF_LIFE_S,
    OBJECTIVES,
    BlendWeights,
    blend_scores,
    decay_factor,
    rank_candidates,
)

CUTOFFS = (10, 20)
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "preference": (1.0,),
    "conversion": (0.0, 0.25, 0.5, 1.0, 2.0),
    "popularity": (0.0, 0.25, 0.5, 1.0, 2.0),
}
# Weight of an objective that a --grid leaves out.
OMITTED_WEIGHTS = {"preference": (1.0,), "conversion": (0.0,), "popularity": (0.0,)}
TABLE_METRICS = ("recall@10", "ndcg@10", "strong_precision@10", "coverage@10", "popularity_bias@10")


class TradeoffError(Exception):
    """An invalid grid, or a grid that the bundle cannot serve."""


# -- the grid ---------------------------------------------------------------------------------


def parse_grid(specs: list[str] | None) -> list[BlendWeights]:
    """Parse ``OBJECTIVE=W1,W2`` entries into the blends of their Cartesian product.

    None gives DEFAULT_GRID. The all-zero blend is left out, because it ranks nothing.
    """
    values = dict(DEFAULT_GRID) if specs is None else dict(OMITTED_WEIGHTS)
    seen: set[str] = set()
    for spec in specs or []:
        name, separator, text = spec.partition("=")
        if not separator or name not in OBJECTIVES:
            raise TradeoffError(
                f"invalid --grid entry {spec!r}: expected OBJECTIVE=W1,W2,... with OBJECTIVE one of {', '.join(OBJECTIVES)}."
            )
        if name in seen:
            raise TradeoffError(f"invalid --grid: {name} is given twice; list all its weights in one entry.")
        seen.add(name)
        values[name] = tuple(_parse_weight(spec, part) for part in text.split(","))

    blends = []
    for combination in itertools.product(*(values[name] for name in OBJECTIVES)):
        if sum(combination) > 0:
            blends.append(BlendWeights(*combination))
    if not blends:
        raise TradeoffError("invalid --grid: every blend has all weights 0; give at least one weight above 0.")
    return list(dict.fromkeys(blends))


def _parse_weight(spec: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise TradeoffError(f"invalid --grid entry {spec!r}: {text!r} is not a number.") from None
    if not (np.isfinite(weight) and weight >= 0):
        raise TradeoffError(f"invalid --grid entry {spec!r}: weight {text} must be a finite number >= 0.")
    return weight


def check_grid_fits_bundle(blends: list[BlendWeights], bundle: PytorchBundle, bundle_dir: Path) -> None:
    if bundle.model.config.conversion_head:
        return
    weighted = sorted({blend.conversion for blend in blends if blend.conversion > 0})
    if weighted:
        raise TradeoffError(
            f"{bundle_dir} has no conversion head, but the grid weighs conversion "
            f"({', '.join(f'{weight:g}' for weight in weighted)}). Pass --grid conversion=0 popularity=0,0.5,1 "
            "(any popularity weights), or train a bundle with the head: `python -m export train` without --no-conversion-head."
        )


# -- inputs of the blend ----------------------------------------------------------------------


def candidates_at_test(bundle: PytorchBundle, dataset: SplitDataset, width: int) -> dict[str, np.ndarray]:
    """Return each test user's top-``width`` candidates by preference, as evaluation ranks them.

    Keys: "items" (users, width) int64, "logits" (users, width) float32 with -inf where
    fewer than ``width`` items remain after exclusion, and "conversion" (users, width)
    float32, absent without the head.
    """
    model = bundle.model.eval()
    cases = [evaluation_case(user, "test") for user in dataset.users]
    sequences: list[tuple[np.ndarray, ...]] = [(items, event_types) for items, event_types, _ in cases]
    if model.config.use_event_value:
        sequences = [sequence + (evaluation_values(user, "test"),) for sequence, user in zip(sequences, dataset.users)]
    outputs = final_outputs(model, sequences)  # (users, hidden)

    with torch.no_grad():
        scores = model.score(outputs)  # (users, items)
        for row, (prefix_items, _, _) in enumerate(cases):
            scores[row, torch.from_numpy(prefix_items)] = float("-inf")
        logits, items = torch.topk(scores, width, dim=1)  # (users, width) each
        candidates = {"items": items.numpy(), "logits": logits.numpy()}
        if model.config.conversion_head:
            candidates["conversion"] = torch.sigmoid(model.conversion_logits(outputs, items)).numpy()
    return candidates


def live_popularity(
    log_interactions, dataset: SplitDataset, candidates: np.ndarray, half_life_s: float
) -> np.ndarray:
    """Return the decayed event count of each candidate at its user's test time: (users, width).

    Users are processed in test-time order with one running vector. Before each test
    point, the vector ages by the time since the previous test point. Then the events
    since that point which are strictly earlier than the test time are added, each aged
    from its own time. Events on items outside the vocabulary are left out.
    """
    vocabulary = dataset.vocabulary
    indices = np.array([vocabulary.index_of(event.item_id) for event in log_interactions], dtype=np.int64)
    times = np.array([event.timestamp_ms for event in log_interactions], dtype=np.int64)
    view_weight = DEFAULT_EVENT_WEIGHTS["view"]
    weights = np.array([DEFAULT_EVENT_WEIGHTS.get(event.event_type, view_weight) for event in log_interactions])
    known = indices != 0
    order = np.argsort(times[known], kind="stable")
    indices, times, weights = indices[known][order], times[known][order], weights[known][order]

    test_times = np.array([user.test_timestamp_ms for user in dataset.users], dtype=np.int64)
    counts = np.zeros(dataset.num_items, dtype=np.float64)  # (items,)
    result = np.zeros(candidates.shape, dtype=np.float64)  # (users, width)
    previous_time = None
    next_event = 0
    for row in np.argsort(test_times, kind="stable"):
        now = test_times[row]
        if previous_time is not None:
            counts *= decay_factor(float(now - previous_time), half_life_s)
        end = int(np.searchsorted(times, now, side="left"))  # first event at or after now
        if end > next_event:
            aged = weights[next_event:end] * decay_factor((now - times[next_event:end]).astype(np.float64), half_life_s)
            np.add.at(counts, indices[next_event:end], aged)
            next_event = end
        previous_time = now
        result[row] = counts[candidates[row]]
    return result


def popularity_percentiles(dataset: SplitDataset) -> np.ndarray:
    """Return each item's training-count percentile among the known items: (items,) in [0, 1].

    Tied counts share their average rank. Index 0 gets 0.
    """
    counts = popularity_counts(dataset)[1:].astype(np.float64)  # (known items,)
    _, inverse, tie_sizes = np.unique(counts, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(tie_sizes) - (tie_sizes - 1) / 2.0  # 1-based
    percentiles = (average_rank[inverse] - 1.0) / max(len(counts) - 1, 1)
    return np.concatenate([[0.0], percentiles])


# -- one blend --------------------------------------------------------------------------------


def blend_metrics(
    weights: BlendWeights,
    candidates: dict[str, np.ndarray],
    popularity: np.ndarray,  # (users, width)
    targets: np.ndarray,  # (users,)
    strong: np.ndarray,  # (users,) bool
    percentiles: np.ndarray,  # (items,)
    cutoffs: tuple[int, ...],
) -> dict[str, float | None]:
    """Re-rank the candidates with one blend and return the metrics at each cutoff."""
    scores = blend_scores(candidates["logits"], weights, candidates.get("conversion"), popularity)  # (users, width)
    order = rank_candidates(scores)  # (users, width)
    ranked_items = np.take_along_axis(candidates["items"], order, axis=1)  # (users, width)
    valid = np.isfinite(np.take_along_axis(scores, order, axis=1))  # False for excluded leftovers
    known_items = len(percentiles) - 1

    metrics: dict[str, float | None] = {}
    for k in cutoffs:
        top, top_valid = ranked_items[:, :k], valid[:, :k]
        hits = (top == targets[:, None]) & top_valid  # (users, k)
        hit = hits.any(axis=1)
        rank = hits.argmax(axis=1)
        metrics[f"recall@{k}"] = float(hit.mean())
        metrics[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean())
        metrics[f"strong_precision@{k}"] = float(strong[hit].mean()) if hit.any() else None
        metrics[f"coverage@{k}"] = float(len(np.unique(top[top_valid])) / known_items)
        metrics[f"popularity_bias@{k}"] = float(percentiles[top[top_valid]].mean()) if top_valid.any() else None
    return metrics


def sweep(
    bundle: PytorchBundle,
    dataset: SplitDataset,
    log_interactions,
    blends: list[BlendWeights],
    half_life_s: float = DEFAULT_HALF_LIFE_S,
    progress=None,
) -> list[dict[str, Any]]:
    """Return one row per blend: {"weights": {...}, "metrics": {...}}."""
    report_progress = progress or (lambda message: None)
    width = bundle.k
    cutoffs = tuple(k for k in CUTOFFS if k <= width)
    if not cutoffs:
        raise TradeoffError(f"the bundle returns {width} candidates, fewer than {CUTOFFS[0]}; train with --candidates 100.")
    if any(user.test_timestamp_ms is None for user in dataset.users):
        raise TradeoffError("the split has no test timestamps; build it with export.sequences.split_leave_one_out.")

    started = time.monotonic()
    report_progress(f"tradeoff: scoring {len(dataset.users)} test users, {width} candidates each")
    candidates = candidates_at_test(bundle, dataset, width)
    report_progress(f"tradeoff: live popularity at each test time (half-life {half_life_s:g} s)")
    popularity = live_popularity(log_interactions, dataset, candidates["items"], half_life_s)
    percentiles = popularity_percentiles(dataset)
    targets = np.array([user.test_item for user in dataset.users])
    strong = np.array([user.test_strong for user in dataset.users]) > 0

    rows = []
    for number, weights in enumerate(blends, start=1):
        metrics = blend_metrics(weights, candidates, popularity, targets, strong, percentiles, cutoffs)
        rows.append({"weights": weights.as_dict(), "metrics": metrics})
        report_progress(f"tradeoff: blend {number} of {len(blends)} done ({time.monotonic() - started:.1f} s)")
    return rows


# -- the command ------------------------------------------------------------------------------


def run_tradeoff(args: argparse.Namespace) -> int:
    from export.__main__ import load_split
    from export.bundle import load_pytorch_model
    from export.sequences import ItemVocabulary

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    blends = parse_grid(args.grid)
    bundle = load_pytorch_model(args.bundle)
    check_grid_fits_bundle(blends, bundle, args.bundle)
    log, dataset = load_split(args, ItemVocabulary(bundle.item_ids[1:]))
    expected = bundle.manifest.get("training_data", {}).get("fingerprint")
    if expected and expected != log.fingerprint:
        print(f"note: {log.name} differs from the data this bundle was trained on (fingerprint mismatch).")

    half_life_s = DEFAULT_HALF_LIFE_S if args.half_life_s is None else args.half_life_s
    rows = sweep(bundle, dataset, log.interactions, blends, half_life_s, progress)
    print_table(rows, len(dataset.users), bundle.k, half_life_s)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    if args.png is not None:
        print(f"png: {write_plot(rows, args.png)}")
    return 0


def print_table(rows: list[dict[str, Any]], num_users: int, width: int, half_life_s: float) -> None:
    print(f"blends over {width} candidates per user, {num_users} test users, popularity half-life {half_life_s:g} s:")
    header = "".join(f"{name:>12}" for name in OBJECTIVES) + "".join(f"{metric:>22}" for metric in TABLE_METRICS)
    print(header)
    for row in rows:
        line = "".join(f"{row['weights'][name]:>12g}" for name in OBJECTIVES)
        for metric in TABLE_METRICS:
            value = row["metrics"].get(metric)
            line += f"{'n/a':>22}" if value is None else f"{value:>22.4f}"
        print(line)


def write_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Draw NDCG@10 against strong precision@10 and against popularity bias@10, one labelled point per blend."""
    import matplotlib

    matplotlib.use("Agg")  # no display is needed to write a file
    from matplotlib import pyplot

    figure, axes_pair = pyplot.subplots(1, 2, figsize=(13, 5))
    for axes, metric, label in (
        (axes_pair[0], "strong_precision@10", "strong precision@10 (share of hits that are strong)"),
        (axes_pair[1], "popularity_bias@10", "popularity bias@10 (mean training-popularity percentile)"),
    ):
        for row in rows:
            x, y = row["metrics"].get(metric), row["metrics"]["ndcg@10"]
            if x is None:
                continue
            weights = row["weights"]
            axes.scatter(x, y, color="tab:blue")
            text = f"c{weights['conversion']:g} p{weights['popularity']:g}"
            if weights["preference"] != 1:
                text = f"w{weights['preference']:g} " + text
            axes.annotate(
                text, (x, y), fontsize=7,
                xytext=(3, 3), textcoords="offset points",
            )
        axes.set(xlabel=label, ylabel="NDCG@10", title=f"NDCG@10 vs {metric}")
    figure.suptitle("blends of preference (w, 1 unless shown), conversion (c) and live popularity (p)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path

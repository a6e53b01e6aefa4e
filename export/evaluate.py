"""Full-ranking evaluation of the model and of two baselines on the leave-one-out split.

Every item in the catalogue is ranked except the user's already-seen items (the whole
input prefix) and the unknown index 0. A target that is itself excluded cannot be
ranked and counts as a miss. Ties are counted against the target: its rank is the number
of other candidates scoring at least as high, so a baseline that gives many items the same
score gains nothing from the tie.

Validation ranks the validation item after the training prefix. Test ranks the test item
after the training prefix followed by the validation item.

A model with a conversion head is also scored at the true target item: the ROC AUC and
the log loss of its probability that the target's interaction is strong, beside the
share of targets that are strong (the base rate).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch

from export.model import GRU4Rec
from export.sequences import SplitDataset, UserSplit

Part = Literal["valid", "test"]
CUTOFFS = (10, 20)


def rank_targets(scores: np.ndarray, targets: np.ndarray, excluded: Sequence[np.ndarray]) -> np.ndarray:
    """Return each target's 0-based rank among the non-excluded items (inf for a miss).

    ``scores`` is (users, items), and ``excluded[u]`` lists the item indices removed from
    user u's ranking. Index 0 is always removed.
    """
    scores = _mask_excluded(scores, excluded)  # (users, items)
    target_scores = scores[np.arange(len(targets)), targets]  # (users,)

    # The target itself is among the items scoring at least its own score.
    ranks = (scores >= target_scores[:, None]).sum(axis=1).astype(np.float64) - 1.0  # (users,)
    ranks[~np.isfinite(target_scores)] = np.inf
    return ranks


def _mask_excluded(scores: np.ndarray, excluded: Sequence[np.ndarray]) -> np.ndarray:
    masked = np.array(scores, dtype=np.float64)  # a copy, so the caller's array is untouched
    masked[:, 0] = -np.inf
    for row, items in enumerate(excluded):
        masked[row, items] = -np.inf
    return masked


def top_items(scores: np.ndarray, excluded: Sequence[np.ndarray], k: int) -> np.ndarray:
    """Return the k best item indices per user, best first: (users, k).

    Slots left over when fewer than k items remain after exclusion hold index 0.
    """
    masked = _mask_excluded(scores, excluded)
    # A stable sort on the negated scores breaks ties by the lower index.
    top = np.argsort(-masked, axis=1, kind="stable")[:, :k]  # (users, k)
    top[np.take_along_axis(masked, top, axis=1) == -np.inf] = 0
    return top


def metrics_at_cutoff(ranks: np.ndarray, k: int) -> dict[str, float]:
    """Mean Recall@k, NDCG@k and MRR@k over users, from 0-based ranks (inf = miss)."""
    hit = ranks < k
    safe_ranks = np.where(hit, ranks, 0.0)
    # With one relevant item, the ideal DCG is 1, so NDCG is the DCG of the hit.
    ndcg = np.where(hit, 1.0 / np.log2(safe_ranks + 2.0), 0.0)
    reciprocal_rank = np.where(hit, 1.0 / (safe_ranks + 1.0), 0.0)
    return {
        f"recall@{k}": float(hit.mean()),
        f"ndcg@{k}": float(ndcg.mean()),
        f"mrr@{k}": float(reciprocal_rank.mean()),
    }


def catalogue_coverage(recommended: np.ndarray, num_known_items: int) -> float:
    """Share of known items (indices 1..N) that appear in at least one top-k list."""
    distinct = np.unique(recommended)
    distinct = distinct[distinct != 0]
    return float(len(distinct) / num_known_items)


class RankingAccumulator:
    """Collects ranks and top-k lists batch by batch, then summarises them."""

    def __init__(self, num_items: int, cutoffs: Sequence[int] = CUTOFFS):
        self.num_items = num_items
        self.cutoffs = tuple(cutoffs)
        self._ranks: list[np.ndarray] = []
        self._top: list[np.ndarray] = []

    def add(self, scores: np.ndarray, targets: np.ndarray, excluded: Sequence[np.ndarray]) -> None:
        self._ranks.append(rank_targets(scores, targets, excluded))
        self._top.append(top_items(scores, excluded, max(self.cutoffs)))

    def result(self) -> dict[str, float]:
        """Return recall, ndcg and mrr at each cutoff, then coverage at each cutoff."""
        if not self._ranks:
            raise ValueError("No users were evaluated.")
        ranks = np.concatenate(self._ranks)
        top = np.concatenate(self._top)

        summary: dict[str, float] = {}
        for k in self.cutoffs:
            summary.update(metrics_at_cutoff(ranks, k))
        for k in self.cutoffs:
            summary[f"coverage@{k}"] = catalogue_coverage(top[:, :k], self.num_items - 1)
        return summary


def evaluation_case(user: UserSplit, part: Part) -> tuple[np.ndarray, np.ndarray, int]:
    """Return (prefix items, prefix event types, target item) for one user and part."""
    if part == "valid":
        return user.train_items, user.train_event_types, user.valid_item
    if part == "test":
        items, event_types = user.test_prefix()
        return items, event_types, user.test_item
    raise ValueError(f"Unknown evaluation part {part!r}; expected 'valid' or 'test'.")


def evaluation_target_strong(user: UserSplit, part: Part) -> float:
    """Return 1.0 when the part's target interaction is strong, else 0.0."""
    if part == "valid":
        return user.valid_strong
    if part == "test":
        return user.test_strong
    raise ValueError(f"Unknown evaluation part {part!r}; expected 'valid' or 'test'.")


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Return the ROC AUC of scores against 0/1 labels, ties counting half; None with one class only."""
    labels = np.asarray(labels, dtype=bool)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return None
    # Mann-Whitney U from average ranks, so tied scores get the mean of their ranks.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # 1-based rank of the last member of each tie group
    average_rank = last_rank - (counts - 1) / 2.0
    positive_rank_sum = float(average_rank[inverse][labels].sum())
    return (positive_rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def conversion_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Return conversion_auc, conversion_log_loss and strong_rate over the evaluated targets."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1.0 - 1e-7)
    labels = np.asarray(labels, dtype=np.float64)
    log_loss = -np.mean(labels * np.log(clipped) + (1.0 - labels) * np.log(1.0 - clipped))
    return {
        "conversion_auc": roc_auc(clipped, labels),
        "conversion_log_loss": float(log_loss),
        "strong_rate": float(labels.mean()),
    }


def evaluation_values(user: UserSplit, part: Part) -> np.ndarray:
    """Return the event values of the prefix that evaluation_case returns (NaN where absent)."""
    if part == "valid":
        return user.train_value_array()
    if part == "test":
        return user.test_prefix_values()
    raise ValueError(f"Unknown evaluation part {part!r}; expected 'valid' or 'test'.")


@torch.no_grad()
def final_outputs(model: GRU4Rec, sequences: Sequence[tuple[np.ndarray, ...]], batch_size: int = 256) -> torch.Tensor:
    """Run the model over each (items, event types[, values]) sequence and return the last outputs.

    Sequences are batched in order of length so that padding stays small. The result is
    (sequences, hidden) in input order.
    """
    was_training = model.training
    model.eval()

    lengths = np.array([len(sequence[0]) for sequence in sequences])
    if (lengths == 0).any():
        raise ValueError("Every sequence needs at least one event.")
    order = np.argsort(lengths, kind="stable")
    outputs = torch.empty(len(sequences), model.config.hidden_size)  # (sequences, hidden)

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        padded = pad_sequences([sequences[i] for i in batch])  # (batch, time) each
        values = padded[2] if len(padded) > 2 else None
        step_outputs, _ = model(padded[0], padded[1], values=values)  # (batch, time, hidden)
        last = torch.as_tensor(lengths[batch] - 1)
        outputs[torch.as_tensor(batch)] = step_outputs[torch.arange(len(batch)), last]  # (batch, hidden)

    model.train(was_training)
    return outputs


def pad_sequences(sequences: Sequence[tuple[np.ndarray, ...]]) -> tuple[torch.Tensor, ...]:
    """Right-pad tuples of equal-length arrays into one (batch, time) tensor per tuple position.

    Integer arrays (items, event types) are padded with index 0 and float arrays (event
    values) with NaN, which the model reads as an absent value.
    """
    longest = max(len(sequence[0]) for sequence in sequences)
    padded = []
    for position in range(len(sequences[0])):
        dtype = np.asarray(sequences[0][position]).dtype
        fill = np.nan if np.issubdtype(dtype, np.floating) else 0
        column = np.full((len(sequences), longest), fill, dtype=dtype)
        for row, sequence in enumerate(sequences):
            column[row, : len(sequence[position])] = sequence[position]
        padded.append(torch.from_numpy(column))
    return tuple(padded)


def evaluate_model(
    model: GRU4Rec, dataset: SplitDataset, part: Part, batch_size: int = 256
) -> dict[str, float]:
    cases = [evaluation_case(user, part) for user in dataset.users]
    sequences: list[tuple[np.ndarray, ...]] = [(items, event_types) for items, event_types, _ in cases]
    if model.config.use_event_value:
        sequences = [sequence + (evaluation_values(user, part),) for sequence, user in zip(sequences, dataset.users)]
    outputs = final_outputs(model, sequences, batch_size)

    accumulator = RankingAccumulator(dataset.num_items)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, len(cases), batch_size):
            batch = cases[start : start + batch_size]
            scores = model.score(outputs[start : start + batch_size]).numpy()  # (batch, items)
            targets = np.array([target for _, _, target in batch])
            accumulator.add(scores, targets, [items for items, _, _ in batch])
        summary = accumulator.result()
        if model.config.conversion_head:
            targets = torch.tensor([target for _, _, target in cases])  # (users,)
            probabilities = torch.sigmoid(model.conversion_logits(outputs, targets[:, None])[:, 0])  # (users,)
            labels = np.array([evaluation_target_strong(user, part) for user in dataset.users])
            summary.update(conversion_metrics(probabilities.numpy(), labels))
    model.train(was_training)
    return summary


def training_sequences(dataset: SplitDataset) -> Iterator[np.ndarray]:
    for user in dataset.users:
        yield user.train_items


def popularity_counts(dataset: SplitDataset) -> np.ndarray:
    """Count each item's interactions in the training prefixes: (items,)."""
    counts = np.zeros(dataset.num_items, dtype=np.int64)
    for items in training_sequences(dataset):
        np.add.at(counts, items, 1)
    return counts


class CooccurrenceCounts:
    """How often item b directly followed item a in the training prefixes.

    Stored sparsely: pairs sorted by (a, b) with their counts, and per-item row offsets,
    so memory grows with the number of distinct pairs, not with items squared.
    """

    def __init__(self, dataset: SplitDataset):
        num_items = dataset.num_items
        pair_codes = [items[:-1] * num_items + items[1:] for items in training_sequences(dataset)]
        codes, counts = np.unique(np.concatenate(pair_codes + [np.empty(0, np.int64)]), return_counts=True)
        self.previous_items = codes // num_items
        self.next_items = codes % num_items
        self.counts = counts
        self.row_starts = np.searchsorted(self.previous_items, np.arange(num_items + 1))

    def followers(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (next items, counts) for the item."""
        start, end = self.row_starts[item], self.row_starts[item + 1]
        return self.next_items[start:end], self.counts[start:end]


def evaluate_popularity(dataset: SplitDataset, part: Part, batch_size: int = 256) -> dict[str, float]:
    """Rank items by their number of training interactions."""
    popularity = popularity_counts(dataset).astype(np.float64)
    accumulator = RankingAccumulator(dataset.num_items)
    for batch in _batches(dataset.users, batch_size):
        cases = [evaluation_case(user, part) for user in batch]
        scores = np.tile(popularity, (len(batch), 1))  # (batch, items)
        accumulator.add(scores, np.array([target for _, _, target in cases]), [items for items, _, _ in cases])
    return accumulator.result()


def evaluate_cooccurrence(dataset: SplitDataset, part: Part, batch_size: int = 256) -> dict[str, float]:
    """Rank items by how often they followed the user's last item, with popularity breaking ties."""
    popularity = popularity_counts(dataset).astype(np.float64)
    # Popularity scaled into [0, 1) changes the order only among equal co-occurrence counts.
    tie_breaker = popularity / (popularity.max() + 1.0)
    cooccurrence = CooccurrenceCounts(dataset)

    accumulator = RankingAccumulator(dataset.num_items)
    for batch in _batches(dataset.users, batch_size):
        cases = [evaluation_case(user, part) for user in batch]
        scores = np.tile(tie_breaker, (len(batch), 1))  # (batch, items)
        for row, (items, _, _) in enumerate(cases):
            next_items, counts = cooccurrence.followers(int(items[-1]))
            scores[row, next_items] += counts
        accumulator.add(scores, np.array([target for _, _, target in cases]), [items for items, _, _ in cases])
    return accumulator.result()


def _batches(users: list[UserSplit], batch_size: int) -> Iterator[list[UserSplit]]:
    for start in range(0, len(users), batch_size):
        yield users[start : start + batch_size]


def evaluate_baselines(dataset: SplitDataset, part: Part = "test") -> dict[str, dict[str, dict[str, float]]]:
    """Return the baselines in the metrics.json shape: {name: {part: metrics}}."""
    return {
        "popularity": {part: evaluate_popularity(dataset, part)},
        "last_item_cooccurrence": {part: evaluate_cooccurrence(dataset, part)},
    }


def evaluate_all(model: GRU4Rec, dataset: SplitDataset) -> dict[str, dict]:
    """Return the metrics.json document: model on valid and test, baselines on test."""
    return {
        "model": {
            "test": evaluate_model(model, dataset, "test"),
            "valid": evaluate_model(model, dataset, "valid"),
        },
        "baselines": evaluate_baselines(dataset, "test"),
    }

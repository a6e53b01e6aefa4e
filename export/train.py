"""Train the GRU model on the training prefixes, with early stopping on validation NDCG@10.

Each user's training prefix is one sequence: the input at step t is item t and the target
is item t+1, with cross-entropy over the full catalogue. By default the softmax leaves out
the items the user has seen up to step t, because evaluation excludes them from the
ranking too. Sequences run whole through nn.GRU (no truncation), batched with users of
similar length so that padding stays small.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from export.evaluate import evaluate_model, pad_sequences
from export.model import GRU4Rec, ModelConfig
from export.sequences import SplitDataset

EARLY_STOPPING_METRIC = "ndcg@10"


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, batching and stopping settings."""

    max_epochs: int = 40
    batch_size: int = 32
    learning_rate: float = 4e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    # Mask each user's already-seen items out of the training softmax, as evaluation
    # excludes them from the ranking.
    exclude_seen_in_loss: bool = True
    # Epochs without a better validation NDCG@10 before training stops.
    patience: int = 8
    seed: int = 42
    # Wall-clock budget for the epoch loop, or None for no limit.
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes={self.max_minutes} must be positive.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    valid_ndcg_at_10: float
    seconds: float  # training and validation
    events_per_second: float  # training targets per second of training


@dataclass
class TrainResult:
    model: GRU4Rec  # the best checkpoint, in eval mode
    best_epoch: int
    best_valid_metrics: dict[str, float]
    stopped_because: str
    seconds: float
    history: list[EpochRecord] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_examples(dataset: SplitDataset) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Return (input items, input event types, target items) for each trainable user.

    A user needs two training items to have one (input, target) pair.
    """
    examples = []
    for user in dataset.users:
        if len(user.train_items) < 2:
            continue
        examples.append((user.train_items[:-1], user.train_event_types[:-1], user.train_items[1:]))
    if not examples:
        raise ValueError("No user has two training interactions, so there is nothing to train on.")
    return examples


def length_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Group example indices into batches of similar length, in random batch order.

    Lengths get ±10% noise before sorting, so batch membership changes between epochs.
    """
    noisy_lengths = lengths * rng.uniform(0.9, 1.1, size=len(lengths))
    order = np.argsort(noisy_lengths)
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


class EarlyStopping:
    """Keeps the best checkpoint by validation NDCG@10 and counts epochs without gain."""

    def __init__(self, model: GRU4Rec, patience: int):
        self.patience = patience
        self.best_state = copy.deepcopy(model.state_dict())
        self.best_metrics: dict[str, float] = {}
        self.best_epoch = 0
        self.epochs_without_gain = 0

    def update(self, epoch: int, metrics: dict[str, float], model: GRU4Rec) -> bool:
        """Record one epoch's validation metrics and return True when training should stop."""
        best_score = self.best_metrics.get(EARLY_STOPPING_METRIC, -1.0)
        if metrics[EARLY_STOPPING_METRIC] > best_score:
            self.best_state = copy.deepcopy(model.state_dict())
            self.best_metrics = metrics
            self.best_epoch = epoch
            self.epochs_without_gain = 0
        else:
            self.epochs_without_gain += 1
        return self.epochs_without_gain >= self.patience


def train_model(
    dataset: SplitDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    show_progress: bool = True,
) -> TrainResult:
    """Train from scratch and return the checkpoint with the best validation NDCG@10."""
    seed_everything(train_config.seed)
    rng = np.random.default_rng(train_config.seed)
    model = GRU4Rec(model_config)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=train_config.learning_rate, weight_decay=train_config.weight_decay
    )

    examples = training_examples(dataset)
    lengths = np.array([len(targets) for _, _, targets in examples])
    started = time.monotonic()
    deadline = None if train_config.max_minutes is None else started + 60.0 * train_config.max_minutes
    early_stopping = EarlyStopping(model, train_config.patience)
    stopped_because = f"reached max_epochs={train_config.max_epochs}"
    history = []

    for epoch in range(1, train_config.max_epochs + 1):
        epoch_started = time.monotonic()
        train_loss = _train_epoch(model, optimizer, examples, lengths, train_config, rng, epoch, show_progress)
        train_seconds = time.monotonic() - epoch_started
        metrics = evaluate_model(model, dataset, "valid")
        record = EpochRecord(
            epoch=epoch,
            train_loss=train_loss,
            valid_ndcg_at_10=metrics[EARLY_STOPPING_METRIC],
            seconds=time.monotonic() - epoch_started,
            events_per_second=float(lengths.sum() / train_seconds),
        )
        history.append(record)
        if show_progress:
            tqdm.write(
                f"epoch {epoch}: train loss {train_loss:.4f}, valid ndcg@10 {metrics['ndcg@10']:.4f}, "
                f"valid recall@10 {metrics['recall@10']:.4f}, {record.seconds:.1f} s, "
                f"{record.events_per_second:,.0f} events/s"
            )

        if early_stopping.update(epoch, metrics, model):
            stopped_because = f"no better valid {EARLY_STOPPING_METRIC} for {train_config.patience} epochs"
            break
        if deadline is not None and time.monotonic() >= deadline:
            stopped_because = f"reached max_minutes={train_config.max_minutes}"
            break

    model.load_state_dict(early_stopping.best_state)
    model.eval()
    return TrainResult(
        model=model,
        best_epoch=early_stopping.best_epoch,
        best_valid_metrics=early_stopping.best_metrics,
        stopped_because=stopped_because,
        seconds=time.monotonic() - started,
        history=history,
    )


def _train_epoch(
    model: GRU4Rec,
    optimizer: torch.optim.Optimizer,
    examples: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    lengths: np.ndarray,
    train_config: TrainConfig,
    rng: np.random.Generator,
    epoch: int,
    show_progress: bool,
) -> float:
    """Run one pass over the training examples and return the mean loss per target."""
    model.train()
    batches = length_batches(lengths, train_config.batch_size, rng)
    total_loss = 0.0
    total_targets = 0

    # The bar counts training targets (events), so its rate is the throughput in events/s.
    progress = tqdm(total=int(lengths.sum()), desc=f"epoch {epoch}", unit="event", disable=not show_progress, leave=False)
    for batch in batches:
        loss, num_targets = _train_batch(model, optimizer, [examples[i] for i in batch], train_config)
        total_loss += loss * num_targets
        total_targets += num_targets

        progress.update(num_targets)
        progress.set_postfix(loss=f"{total_loss / total_targets:.4f}")
    progress.close()
    return total_loss / total_targets


def _train_batch(
    model: GRU4Rec,
    optimizer: torch.optim.Optimizer,
    batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    train_config: TrainConfig,
) -> tuple[float, int]:
    items, event_types = pad_sequences([(inputs, types) for inputs, types, _ in batch])  # (batch, time) each
    targets, _ = pad_sequences([(targets, targets) for _, _, targets in batch])  # (batch, time)
    mask = targets != 0  # (batch, time), False at padding, whose target is index 0

    outputs, _ = model(items, event_types)  # (batch, time, hidden)
    # Score only real positions, so padding costs no catalogue-sized logits.
    logits = model.score(outputs[mask])  # (targets, items)
    if train_config.exclude_seen_in_loss:
        logits = _mask_seen_items(logits, items, mask, targets[mask], model.config.num_items)
    loss = F.cross_entropy(logits, targets[mask])

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
    optimizer.step()
    return float(loss.item()), int(mask.sum())


def _mask_seen_items(
    logits: torch.Tensor, items: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, num_items: int
) -> torch.Tensor:
    """Set the logits of items seen up to each position to -inf, except the target's."""
    batch, time = items.shape
    positions = torch.arange(time, dtype=torch.int32)  # (time,)

    # An item is seen at position t when its first occurrence is at or before t.
    first_seen = torch.full((batch, num_items), time, dtype=torch.int32)  # (batch, items)
    first_seen.scatter_reduce_(1, items, positions.expand(batch, time), reduce="amin")
    seen = (first_seen[:, None, :] <= positions[None, :, None])[mask]  # (targets, items)

    # A repeated item may be its own target; masking it would make the loss infinite.
    seen[torch.arange(len(targets)), targets] = False
    return logits.masked_fill(seen, float("-inf"))

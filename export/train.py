"""Train the model on the training prefixes, with early stopping on validation NDCG@10.

Each user's training prefix is one sequence: the input at step t is event t and the target
is item t+1. By default the loss leaves out the items the user has seen up to step t as
negatives, because evaluation excludes them from the ranking too. Two ways to batch:

- ``sequence`` (default): sequences run whole through the cell (no truncation), batched
  with users of similar length so that padding stays small, and gradients flow through
  the whole sequence.
- ``session_parallel``: GRU4Rec's mini-batches. Each of ``batch_size`` slots contains one
  sequence and advances one event per step; a slot whose sequence ends takes the next one
  and its state is reset to zero, and the batch shrinks once no sequence is left. The
  state is detached after every step, so gradients cover one step.

Either way the loss is one of ``export.losses.LOSSES``. A model with a conversion head
adds ``conversion_weight`` x the binary cross-entropy of the head at each target item,
labelled 1 when the target's interaction was strong. Unless ``conversion_shares_encoder``
is set, that loss reaches only the head's own weights, with their gradients clipped apart. With ``checkpoint_dir`` set, the
best weights are saved there after every improvement (``best.pt``, the bundle checkpoint
format) and the whole training state after every epoch (``last.pt``), from which
``resume`` continues.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from export.evaluate import evaluate_model, pad_sequences, popularity_counts
from export.losses import LOSSES, NegativeSampler, compute_loss
from export.model import GRU4Rec, ModelConfig, RecurrentState
from export.sequences import SplitDataset

EARLY_STOPPING_METRIC = "ndcg@10"
METHODS = ("sequence", "session_parallel")
BEST_CHECKPOINT_FILE = "best.pt"
LAST_CHECKPOINT_FILE = "last.pt"


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
    method: str = "sequence"
    loss: str = "cross_entropy"
    # Popularity-weighted negatives drawn per mini-batch for the sampled losses, on top of
    # the mini-batch's own targets.
    num_negatives: int = 256
    # Exponent on item popularity when drawing negatives: 0 is uniform, 1 is popularity.
    negative_alpha: float = 0.75
    # Weight of BPR-max's penalty on the squared scores of the negatives.
    bpr_max_regularization: float = 1.0
    # Folder for best.pt and last.pt, or None to keep checkpoints in memory only.
    checkpoint_dir: str | None = None
    # Continue from checkpoint_dir/last.pt when it exists.
    resume: bool = False
    # Weight of the conversion head's binary cross-entropy in the joint loss; 0 leaves the
    # head untrained. Ignored by a model without the head.
    conversion_weight: float = 1.0
    # Let the conversion loss train the embeddings and the recurrent cell too. Off, the head
    # learns from the cell outputs as they are, so next-item quality is that of a model
    # without the head.
    conversion_shares_encoder: bool = False

    def __post_init__(self) -> None:
        for name in ("max_epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be positive.")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"max_minutes={self.max_minutes} must be positive.")
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not supported; expected one of {', '.join(METHODS)}.")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r} is not supported; expected one of {', '.join(LOSSES)}.")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives={self.num_negatives} must not be negative.")
        if self.negative_alpha < 0:
            raise ValueError(f"negative_alpha={self.negative_alpha} must not be negative.")
        if not (np.isfinite(self.conversion_weight) and self.conversion_weight >= 0):
            raise ValueError(f"conversion_weight={self.conversion_weight} must be a finite number >= 0.")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir, the folder that contains last.pt.")

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


@dataclass(frozen=True)
class TrainingSequence:
    """One user's inputs (events 0..n-2) and targets (items 1..n-1)."""

    items: np.ndarray  # (length,) int64
    event_types: np.ndarray  # (length,) int64
    values: np.ndarray  # (length,) float32, NaN where absent
    targets: np.ndarray  # (length,) int64
    target_strong: np.ndarray  # (length,) float32, 1 where the target's interaction is strong


def training_examples(dataset: SplitDataset) -> list[TrainingSequence]:
    """Return the training sequence of each trainable user.

    A user needs two training items to have one (input, target) pair.
    """
    examples = []
    for user in dataset.users:
        if len(user.train_items) < 2:
            continue
        values = user.train_value_array()
        strong = user.train_strong_labels()
        examples.append(
            TrainingSequence(
                user.train_items[:-1], user.train_event_types[:-1], values[:-1], user.train_items[1:], strong[1:]
            )
        )
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

    @property
    def improved(self) -> bool:
        """True when the last update found a new best."""
        return self.epochs_without_gain == 0 and self.best_epoch > 0

    def state_dict(self) -> dict:
        return {
            "best_state": self.best_state,
            "best_metrics": self.best_metrics,
            "best_epoch": self.best_epoch,
            "epochs_without_gain": self.epochs_without_gain,
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_state = state["best_state"]
        self.best_metrics = state["best_metrics"]
        self.best_epoch = state["best_epoch"]
        self.epochs_without_gain = state["epochs_without_gain"]


def build_model(dataset: SplitDataset, model_config: ModelConfig) -> GRU4Rec:
    """Create the model and load the dataset's item feature table and value scaling into it."""
    model = GRU4Rec(model_config)
    if model_config.num_item_features:
        features = dataset.item_features
        available = 0 if features is None else features.num_features
        if available != model_config.num_item_features:
            raise ValueError(
                f"The model expects {model_config.num_item_features} item features but the dataset has {available}; "
                "load the item metadata or turn item features off."
            )
        model.set_item_features(features.table)
    if model_config.use_event_value:
        model.set_value_scaling(*dataset.value_scaling())
    return model


def train_model(
    dataset: SplitDataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    show_progress: bool = True,
) -> TrainResult:
    """Train (from scratch or from last.pt) and return the checkpoint with the best validation NDCG@10."""
    seed_everything(train_config.seed)
    rng = np.random.default_rng(train_config.seed)
    model = build_model(dataset, model_config)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=train_config.learning_rate, weight_decay=train_config.weight_decay
    )
    sampler = NegativeSampler(
        popularity_counts(dataset), train_config.negative_alpha, torch.Generator().manual_seed(train_config.seed)
    )

    examples = training_examples(dataset)
    lengths = np.array([len(example.targets) for example in examples])
    started = time.monotonic()
    deadline = None if train_config.max_minutes is None else started + 60.0 * train_config.max_minutes
    early_stopping = EarlyStopping(model, train_config.patience)
    stopped_because = f"reached max_epochs={train_config.max_epochs}"
    history: list[EpochRecord] = []
    first_epoch = 1
    if train_config.resume:
        first_epoch, history = _resume(train_config, model, optimizer, early_stopping, rng, sampler)

    for epoch in range(first_epoch, train_config.max_epochs + 1):
        epoch_started = time.monotonic()
        train_loss = _train_epoch(model, optimizer, examples, lengths, train_config, rng, sampler, epoch, show_progress)
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

        should_stop = early_stopping.update(epoch, metrics, model)
        if train_config.checkpoint_dir is not None:
            _save_checkpoints(train_config, epoch, model, optimizer, early_stopping, history, rng, sampler)
        if should_stop:
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


# -- checkpoints ------------------------------------------------------------------------------


def _save_checkpoints(
    train_config: TrainConfig,
    epoch: int,
    model: GRU4Rec,
    optimizer: torch.optim.Optimizer,
    early_stopping: EarlyStopping,
    history: list[EpochRecord],
    rng: np.random.Generator,
    sampler: NegativeSampler,
) -> None:
    folder = Path(train_config.checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if early_stopping.improved:
        best = {"model_config": model.config.to_dict(), "state_dict": early_stopping.best_state}
        _atomic_save(best, folder / BEST_CHECKPOINT_FILE)

    last = {
        "epoch": epoch,
        "model_config": model.config.to_dict(),
        "train_config": train_config.to_dict(),
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "early_stopping": early_stopping.state_dict(),
        "history": [asdict(record) for record in history],
        "numpy_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "sampler_rng": sampler.generator.get_state(),
        "python_rng": random.getstate(),
    }
    _atomic_save(last, folder / LAST_CHECKPOINT_FILE)


def _atomic_save(document: dict, path: Path) -> None:
    # Written beside the target, then renamed, so a crash never leaves half a checkpoint.
    partial = path.with_suffix(".partial")
    torch.save(document, partial)
    os.replace(partial, path)


def _resume(
    train_config: TrainConfig,
    model: GRU4Rec,
    optimizer: torch.optim.Optimizer,
    early_stopping: EarlyStopping,
    rng: np.random.Generator,
    sampler: NegativeSampler,
) -> tuple[int, list[EpochRecord]]:
    """Restore the training state from last.pt; return the next epoch and the history so far."""
    path = Path(train_config.checkpoint_dir) / LAST_CHECKPOINT_FILE
    if not path.exists():
        return 1, []
    # The file also stores optimizer and random generator states, which are not plain tensors.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["model_config"] != model.config.to_dict():
        raise ValueError(
            f"{path} was written for model settings {checkpoint['model_config']}, not {model.config.to_dict()}; "
            "use the same settings or another checkpoint folder."
        )

    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    early_stopping.load_state_dict(checkpoint["early_stopping"])
    rng.bit_generator.state = checkpoint["numpy_rng"]
    torch.set_rng_state(checkpoint["torch_rng"])
    sampler.generator.set_state(checkpoint["sampler_rng"])
    random.setstate(checkpoint["python_rng"])
    history = [EpochRecord(**record) for record in checkpoint["history"]]
    return checkpoint["epoch"] + 1, history


# -- one epoch --------------------------------------------------------------------------------


def _train_epoch(
    model: GRU4Rec,
    optimizer: torch.optim.Optimizer,
    examples: list[TrainingSequence],
    lengths: np.ndarray,
    train_config: TrainConfig,
    rng: np.random.Generator,
    sampler: NegativeSampler,
    epoch: int,
    show_progress: bool,
) -> float:
    """Run one pass over the training examples and return the mean loss per target."""
    model.train()
    # The bar counts training targets (events), so its rate is the throughput in events/s.
    progress = tqdm(total=int(lengths.sum()), desc=f"epoch {epoch}", unit="event", disable=not show_progress, leave=False)
    if train_config.method == "session_parallel":
        batches = _session_parallel_batches(model, examples, train_config.batch_size, rng)
    else:
        batches = _sequence_batches(model, examples, lengths, train_config, rng)

    total_loss = 0.0
    total_targets = 0
    for outputs, targets, seen, strong in batches:
        loss = compute_loss(
            train_config.loss,
            model,
            outputs,
            targets,
            seen=seen if train_config.exclude_seen_in_loss else None,
            sampler=sampler,
            num_negatives=train_config.num_negatives,
            bpr_max_regularization=train_config.bpr_max_regularization,
        )
        shared = train_config.conversion_shares_encoder
        if model.config.conversion_head and train_config.conversion_weight:
            head_inputs = outputs if shared else outputs.detach()
            loss = loss + train_config.conversion_weight * conversion_loss(model, head_inputs, targets, strong)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if shared:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.max_grad_norm)
        else:
            # Clipping the head apart keeps its gradients from scaling down the next-item ones.
            head, rest = _split_conversion_parameters(model)
            torch.nn.utils.clip_grad_norm_(rest, train_config.max_grad_norm)
            if head:
                torch.nn.utils.clip_grad_norm_(head, train_config.max_grad_norm)
        optimizer.step()

        total_loss += float(loss.item()) * len(targets)
        total_targets += len(targets)
        progress.update(len(targets))
        progress.set_postfix(loss=f"{total_loss / total_targets:.4f}")
    progress.close()
    return total_loss / total_targets


# A training batch: cell outputs (targets, hidden), target items (targets,), the
# (targets, items) mask of already-seen items with the target's own column left False,
# and the targets' strong labels (targets,) float32.
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _split_conversion_parameters(model: GRU4Rec) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Return the conversion head's parameters and all the others."""
    head, rest = [], []
    for name, parameter in model.named_parameters():
        (head if name.startswith("conversion_") else rest).append(parameter)
    return head, rest


def conversion_loss(model: GRU4Rec, outputs: torch.Tensor, targets: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    """Return the mean binary cross-entropy of the conversion head at the target items."""
    logits = model.conversion_logits(outputs, targets[:, None])[:, 0]  # (targets,)
    return F.binary_cross_entropy_with_logits(logits, strong)


def _sequence_batches(
    model: GRU4Rec,
    examples: list[TrainingSequence],
    lengths: np.ndarray,
    train_config: TrainConfig,
    rng: np.random.Generator,
) -> Iterator[Batch]:
    """Yield whole-sequence batches of users with similar lengths."""
    for batch in length_batches(lengths, train_config.batch_size, rng):
        chosen = [examples[i] for i in batch]
        items, event_types, values, targets, strong = pad_sequences(
            [(example.items, example.event_types, example.values, example.targets, example.target_strong) for example in chosen]
        )  # (batch, time) each
        mask = targets != 0  # (batch, time), False at padding, whose target is index 0

        values = values if model.config.use_event_value else None
        outputs, _ = model(items, event_types, values=values)  # (batch, time, hidden)
        seen = seen_items(items, mask, targets[mask], model.config.num_items)  # (targets, items)
        # Only real positions are scored, so padding costs no catalogue-sized logits.
        yield outputs[mask], targets[mask], seen, strong[mask]


def _session_parallel_batches(
    model: GRU4Rec, examples: list[TrainingSequence], batch_size: int, rng: np.random.Generator
) -> Iterator[Batch]:
    """Yield one step of every active slot; see the module docstring for the slot rules."""
    order = rng.permutation(len(examples))
    slots = min(batch_size, len(order))
    slot_sequence = order[:slots].copy()  # (slots,) index into examples
    slot_position = np.zeros(slots, dtype=np.int64)  # (slots,) next event of the slot's sequence
    next_sequence = slots
    state = model.initial_state(slots)
    seen = torch.zeros(slots, model.config.num_items, dtype=torch.bool)  # (slots, items)

    while len(slot_sequence):
        chosen = [examples[i] for i in slot_sequence]
        items = torch.tensor([example.items[p] for example, p in zip(chosen, slot_position)])  # (slots,)
        event_types = torch.tensor([example.event_types[p] for example, p in zip(chosen, slot_position)])
        targets = torch.tensor([example.targets[p] for example, p in zip(chosen, slot_position)])
        strong = torch.tensor([example.target_strong[p] for example, p in zip(chosen, slot_position)])
        values = None
        if model.config.use_event_value:
            values = torch.tensor(np.array([example.values[p] for example, p in zip(chosen, slot_position)]))[:, None]

        outputs, state = model(items[:, None], event_types[:, None], state, values=values)  # (slots, 1, hidden)
        seen[torch.arange(len(items)), items] = True
        step_seen = seen.clone()
        step_seen[torch.arange(len(targets)), targets] = False
        yield outputs[:, 0], targets, step_seen, strong

        # Gradients cover one step, so the state is cut from the graph before the next.
        state = _detach(state)
        slot_position += 1
        ended = np.flatnonzero(slot_position == [len(example.targets) for example in chosen])
        keep = np.ones(len(slot_sequence), dtype=bool)
        for slot in ended:
            if next_sequence < len(order):
                slot_sequence[slot] = order[next_sequence]
                slot_position[slot] = 0
                next_sequence += 1
                state = _reset_slot(state, slot)
                seen[slot] = False
            else:
                keep[slot] = False
        if not keep.all():
            # No sequence is left for these slots, so the batch shrinks.
            slot_sequence, slot_position = slot_sequence[keep], slot_position[keep]
            rows = torch.from_numpy(np.flatnonzero(keep))
            state = _select_slots(state, rows)
            seen = seen[rows]


def _detach(state: RecurrentState) -> RecurrentState:
    if isinstance(state, tuple):
        return tuple(part.detach() for part in state)
    return state.detach()


def _reset_slot(state: RecurrentState, slot: int) -> RecurrentState:
    def reset(part: torch.Tensor) -> torch.Tensor:
        part = part.clone()
        part[:, slot] = 0.0  # (layers, slots, hidden)
        return part

    return tuple(reset(part) for part in state) if isinstance(state, tuple) else reset(state)


def _select_slots(state: RecurrentState, rows: torch.Tensor) -> RecurrentState:
    if isinstance(state, tuple):
        return tuple(part[:, rows].contiguous() for part in state)
    return state[:, rows].contiguous()


def seen_items(items: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, num_items: int) -> torch.Tensor:
    """Return the (targets, items) mask of items seen up to each position, except the target's."""
    batch, time = items.shape
    positions = torch.arange(time, dtype=torch.int32)  # (time,)

    # An item is seen at position t when its first occurrence is at or before t.
    first_seen = torch.full((batch, num_items), time, dtype=torch.int32)  # (batch, items)
    first_seen.scatter_reduce_(1, items, positions.expand(batch, time), reduce="amin")
    seen = (first_seen[:, None, :] <= positions[None, :, None])[mask]  # (targets, items)

    # A repeated item may be its own target; masking it would make the loss infinite.
    seen[torch.arange(len(targets)), targets] = False
    return seen


def _mask_seen_items(
    logits: torch.Tensor, items: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor, num_items: int
) -> torch.Tensor:
    """Set the logits of items seen up to each position to -inf, except the target's."""
    return logits.masked_fill(seen_items(items, mask, targets, num_items), float("-inf"))

"""Losses, negative sampling, session-parallel batches and checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from export_helpers import make_interactions

from export.bundle import load_checkpoint
from export.losses import NegativeSampler, bpr_max_loss, compute_loss
from export.model import GRU4Rec, ModelConfig
from export.sequences import split_leave_one_out
from export.train import TrainConfig, TrainingSequence, _session_parallel_batches, train_model

TINY_MODEL = {"embedding_size": 8, "hidden_size": 16}


def cyclic_dataset(users: int = 24, events: int = 14, items: int = 20):
    """Users who each walk the item cycle from a different start: easy to learn."""
    rows = [(str(user + 1), str((user * 7 + step) % items + 1), 1_000 + step) for user in range(users) for step in range(events)]
    return split_leave_one_out(make_interactions(rows))


def tiny_model(num_items: int = 12, **options) -> GRU4Rec:
    torch.manual_seed(0)
    return GRU4Rec(ModelConfig(num_items=num_items, **TINY_MODEL, **options))


def test_sampler_never_draws_unknown_or_unseen_items():
    counts = np.array([50, 0, 3, 0, 9])
    sampler = NegativeSampler(counts, alpha=0.75, generator=torch.Generator().manual_seed(0))

    drawn = sampler.sample(2_000)

    assert set(drawn.tolist()) == {2, 4}
    # Item 4 has 3x the count of item 2, so it is drawn about 3**0.75 = 2.3 times as often.
    ratio = (drawn == 4).sum().item() / (drawn == 2).sum().item()
    assert 1.9 < ratio < 2.8


def test_sampler_without_training_items_is_rejected():
    with pytest.raises(ValueError, match="No item has a training interaction"):
        NegativeSampler(np.array([5, 0, 0]), alpha=1.0, generator=torch.Generator())


def test_sampled_cross_entropy_in_batch_negatives():
    model = tiny_model()
    outputs = torch.randn(3, 16)
    targets = torch.tensor([2, 5, 2])  # rows 0 and 2 share a target: an accidental hit

    loss = compute_loss("sampled_cross_entropy", model, outputs, targets)

    logits = model.project_outputs(outputs) @ model.output_weights()[targets].T + model.output_bias[targets]
    # Row 0 keeps its own column and row 1's (target 5); row 2's column is the same item.
    expected = [
        -torch.log_softmax(logits[0, [0, 1]], 0)[0],
        -torch.log_softmax(logits[1, [0, 1, 2]], 0)[1],
        -torch.log_softmax(logits[2, [1, 2]], 0)[1],
    ]
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_bpr_max_matches_definition():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [0.0, 0.0, 1.0]])
    mask = torch.eye(3, dtype=torch.bool)
    mask[2, 0] = True  # row 2 has a single negative, column 1

    loss = bpr_max_loss(logits, mask, regularization=0.5)

    expected = []
    for row in range(3):
        negatives = [column for column in range(3) if not mask[row, column]]
        weights = torch.softmax(logits[row, negatives], 0)
        ranking = (weights * torch.sigmoid(logits[row, row] - logits[row, negatives])).sum()
        penalty = (weights * logits[row, negatives] ** 2).sum()
        expected.append(-torch.log(ranking) + 0.5 * penalty)
    torch.testing.assert_close(loss, torch.stack(expected).mean())


def test_bpr_max_row_without_negatives_adds_nothing():
    logits = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[True, True], [False, True]])

    loss = bpr_max_loss(logits, mask, regularization=0.0)

    # Only row 1 counts: its positive (column 1, score 0) against negative column 0 (score 3).
    expected = -math.log(1 / (1 + math.exp(3.0)))
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_seen_items_are_not_negatives_in_sampled_loss():
    model = tiny_model()
    outputs = torch.randn(2, 16)
    targets = torch.tensor([2, 5])
    seen = torch.zeros(2, 12, dtype=torch.bool)
    seen[0, 5] = True  # row 0 has seen row 1's target

    with_seen = compute_loss("sampled_cross_entropy", model, outputs, targets, seen=seen)

    # Row 0 has no negative left, so its loss is 0; row 1 is unchanged.
    logits = model.project_outputs(outputs) @ model.output_weights()[targets].T + model.output_bias[targets]
    expected = -torch.log_softmax(logits[1], 0)[1] / 2
    torch.testing.assert_close(with_seen, expected)


def test_unknown_loss_is_rejected():
    with pytest.raises(ValueError, match="Unknown loss 'hinge'"):
        compute_loss("hinge", tiny_model(), torch.randn(1, 16), torch.tensor([1]))


def sequence(items: list[int]) -> TrainingSequence:
    array = np.array(items, dtype=np.int64)
    length = len(items) - 1
    return TrainingSequence(
        array[:-1], np.zeros(length, dtype=np.int64), np.full(length, np.nan, np.float32), array[1:], np.zeros(length, np.float32)
    )


def test_session_parallel_slots_take_next_sequence_and_reset():
    model = tiny_model(num_items=20).eval()
    examples = [sequence([1, 2, 3]), sequence([4, 5]), sequence([6, 7, 8, 9])]
    rng = np.random.default_rng(1)
    assert np.random.default_rng(1).permutation(3).tolist() == [0, 1, 2]  # the order the slots take

    with torch.no_grad():
        batches = list(_session_parallel_batches(model, examples, batch_size=2, rng=rng))

    # Sequence 1 ends after one step and slot 1 takes sequence 2; then sequence 0 ends
    # with nothing left to start, so the batch shrinks to one slot.
    assert [batch[1].tolist() for batch in batches] == [[2, 5], [3, 7], [8], [9]]

    # Slot 1 restarts from the zero state: its output equals a fresh run over item 6.
    with torch.no_grad():
        fresh, _ = model(torch.tensor([[6]]), torch.tensor([[0]]))
    torch.testing.assert_close(batches[1][0][1], fresh[0, 0])
    # Its seen mask holds only the new sequence's item, while slot 0 has seen 1 and 2.
    assert batches[1][2][1].nonzero().flatten().tolist() == [6]
    assert batches[1][2][0].nonzero().flatten().tolist() == [1, 2]


@pytest.mark.parametrize("method", ["sequence", "session_parallel"])
@pytest.mark.parametrize("loss", ["cross_entropy", "sampled_cross_entropy", "bpr_max"])
def test_each_method_and_loss_learns(method, loss):
    dataset = cyclic_dataset()
    config = ModelConfig(num_items=dataset.num_items, **TINY_MODEL)
    train_config = TrainConfig(
        max_epochs=4, batch_size=8, learning_rate=2e-2, patience=10, method=method, loss=loss, num_negatives=8
    )

    result = train_model(dataset, config, train_config, show_progress=False)

    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.best_valid_metrics["ndcg@10"] > 0.3


def test_best_checkpoint_is_saved_and_loadable(tmp_path):
    dataset = cyclic_dataset()
    config = ModelConfig(num_items=dataset.num_items, cell="lstm", **TINY_MODEL)

    result = train_model(
        dataset, config, TrainConfig(max_epochs=2, batch_size=8, checkpoint_dir=str(tmp_path)), show_progress=False
    )

    loaded = load_checkpoint(tmp_path / "best.pt")
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert (tmp_path / "last.pt").is_file()


@pytest.mark.parametrize("method", ["sequence", "session_parallel"])
def test_resumed_training_equals_uninterrupted(tmp_path, method):
    dataset = cyclic_dataset()
    config = ModelConfig(num_items=dataset.num_items, **TINY_MODEL)
    settings = {"batch_size": 8, "patience": 10, "method": method, "loss": "sampled_cross_entropy", "num_negatives": 4}

    whole = train_model(dataset, config, TrainConfig(max_epochs=3, **settings), show_progress=False)
    train_model(dataset, config, TrainConfig(max_epochs=2, checkpoint_dir=str(tmp_path), **settings), show_progress=False)
    resumed = train_model(
        dataset, config, TrainConfig(max_epochs=3, checkpoint_dir=str(tmp_path), resume=True, **settings), show_progress=False
    )

    assert [record.epoch for record in resumed.history] == [1, 2, 3]
    assert [record.train_loss for record in resumed.history] == [record.train_loss for record in whole.history]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_resume_with_other_model_settings_is_rejected(tmp_path):
    dataset = cyclic_dataset()
    train_model(
        dataset, ModelConfig(num_items=dataset.num_items, **TINY_MODEL),
        TrainConfig(max_epochs=1, checkpoint_dir=str(tmp_path)), show_progress=False,
    )

    with pytest.raises(ValueError, match="was written for model settings"):
        train_model(
            dataset, ModelConfig(num_items=dataset.num_items, cell="lstm", **TINY_MODEL),
            TrainConfig(max_epochs=2, checkpoint_dir=str(tmp_path), resume=True), show_progress=False,
        )


def test_train_config_rejects_unknown_method_and_loss():
    with pytest.raises(ValueError, match="method='minibatch'"):
        TrainConfig(method="minibatch")
    with pytest.raises(ValueError, match="loss='top1'"):
        TrainConfig(loss="top1")
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        TrainConfig(resume=True)

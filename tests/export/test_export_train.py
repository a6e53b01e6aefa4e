from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from export_helpers import REPO_ROOT, make_interactions

from export.__main__ import main
from export.data import load_movielens
from export.evaluate import evaluate_model
from export.model import ModelConfig
from export.sequences import split_leave_one_out
from export.train import TrainConfig, length_batches, train_model


def cyclic_rows(users: int = 40, events: int = 25, items: int = 30) -> list[tuple[str, str, int]]:
    """Users who each walk the item cycle 1..items from a different start: easy to learn."""
    rows = []
    for user in range(users):
        for step in range(events):
            rows.append((str(user + 1), str((user * 7 + step) % items + 1), 1_000 + step))
    return rows


def write_cyclic_dataset(folder):
    dataset_dir = folder / "ml-100k"
    dataset_dir.mkdir(parents=True)
    lines = [f"{user}\t{item}\t4\t{seconds}" for user, item, seconds in cyclic_rows()]
    (dataset_dir / "u.data").write_text("\n".join(lines) + "\n", encoding="ascii")
    return dataset_dir


TINY_MODEL = {"embedding_size": 8, "hidden_size": 16}


def test_train_smoke_on_movielens_subset(movielens_path):
    subset = [event for event in load_movielens(movielens_path) if int(event.user_id) <= 50]
    dataset = split_leave_one_out(subset)
    config = ModelConfig(num_items=dataset.num_items, embedding_size=16, hidden_size=32)

    result = train_model(dataset, config, TrainConfig(max_epochs=3, batch_size=16, seed=1), show_progress=False)

    assert len(result.history) == 3
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert not result.model.training
    # The returned model is the best checkpoint, not the last epoch's weights.
    assert evaluate_model(result.model, dataset, "valid") == result.best_valid_metrics
    assert result.best_valid_metrics["ndcg@10"] == max(record.valid_ndcg_at_10 for record in result.history)


def test_training_learns_a_cycle():
    dataset = split_leave_one_out(make_interactions(cyclic_rows()))
    config = ModelConfig(num_items=dataset.num_items, **TINY_MODEL)

    result = train_model(dataset, config, TrainConfig(max_epochs=30, batch_size=8, learning_rate=2e-2, patience=30), show_progress=False)

    assert evaluate_model(result.model, dataset, "test")["recall@10"] > 0.9


def test_training_is_repeatable_with_seed():
    dataset = split_leave_one_out(make_interactions(cyclic_rows()))
    config = ModelConfig(num_items=dataset.num_items, **TINY_MODEL)

    first = train_model(dataset, config, TrainConfig(max_epochs=2, seed=3), show_progress=False)
    second = train_model(dataset, config, TrainConfig(max_epochs=2, seed=3), show_progress=False)

    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name


def test_patience_stops_training():
    dataset = split_leave_one_out(make_interactions(cyclic_rows()))
    config = ModelConfig(num_items=dataset.num_items, **TINY_MODEL)

    # With a negligible learning rate, validation never improves after the first epoch.
    result = train_model(dataset, config, TrainConfig(max_epochs=10, learning_rate=1e-12, patience=2), show_progress=False)

    assert len(result.history) == 3
    assert result.best_epoch == 1
    assert "no better valid ndcg@10 for 2 epochs" in result.stopped_because


def test_time_budget_stops_training():
    dataset = split_leave_one_out(make_interactions(cyclic_rows()))
    config = ModelConfig(num_items=dataset.num_items, **TINY_MODEL)

    result = train_model(dataset, config, TrainConfig(max_epochs=10, max_minutes=1e-6), show_progress=False)

    assert len(result.history) == 1
    assert "max_minutes" in result.stopped_because


def test_length_batches_cover_every_example_once():
    lengths = np.array([5, 50, 7, 48, 6, 52, 3])

    batches = length_batches(lengths, batch_size=3, rng=np.random.default_rng(0))

    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    assert all(len(batch) <= 3 for batch in batches)


def test_cli_train_then_evaluate(tmp_path, capsys):
    write_cyclic_dataset(tmp_path / "data")
    out_dir = tmp_path / "bundle"

    status = main([
        "train", "--data", str(tmp_path / "data"), "--out", str(out_dir), "--epochs", "2",
        "--hidden-size", "16", "--embedding-size", "8", "--k", "5", "--quiet",
    ])
    printed = capsys.readouterr().out

    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert status == 0
    assert f"model_version: {manifest['model_version']}" in printed
    assert f"bundle: {out_dir.resolve()}" in printed
    assert "last_item_cooccurrence" in printed
    assert "parity: hidden max abs diff" in printed
    assert manifest["k"] == 5
    assert manifest["training_data"]["interactions"] == 1000
    assert manifest["training_data"]["users"] == 40
    assert manifest["train_config"]["training"]["max_epochs"] == 2

    status = main(["evaluate", "--bundle", str(out_dir), "--data", str(tmp_path / "data")])
    printed = capsys.readouterr().out

    assert status == 0
    assert f"{manifest['metrics']['ndcg@10']:.4f}" in printed


def test_cli_missing_data_is_one_line_error(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "export", "train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert completed.stderr.startswith("error: Dataset ml-100k not found in")
    assert "python -m export download" in completed.stderr


def test_cli_rejects_invalid_option(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", "--out", "x", "--epochs", "0"])

    assert raised.value.code == 2
    assert "0 is not a positive integer" in capsys.readouterr().err


def test_seen_items_masked_in_loss_except_target():
    from export.train import _mask_seen_items

    items = torch.tensor([[3, 5, 3, 0]])  # (batch, time); the last position is padding
    mask = torch.tensor([[True, True, True, False]])
    targets = torch.tensor([5, 3, 7])  # one per real position; 3 repeats an earlier item
    logits = torch.zeros(3, 8)

    masked = _mask_seen_items(logits, items, mask, targets, num_items=8)

    minus_inf = float("-inf")
    assert masked[0].tolist() == [0, 0, 0, minus_inf, 0, 0, 0, 0]
    assert masked[1].tolist() == [0, 0, 0, 0, 0, minus_inf, 0, 0]
    assert masked[2].tolist() == [0, 0, 0, minus_inf, 0, minus_inf, 0, 0]


def test_cli_rejects_k_beyond_catalogue_before_training(tmp_path, capsys):
    write_cyclic_dataset(tmp_path / "data")

    status = main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--k", "31"])

    assert status == 1
    assert "--candidates 31 is larger than the 30 items" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_defaults_match_config_defaults():
    from export.__main__ import build_parser

    args = build_parser().parse_args(["train", "--out", "x"])
    model_defaults = ModelConfig(num_items=10)
    train_defaults = TrainConfig()

    assert args.hidden_size == model_defaults.hidden_size
    assert args.embedding_size == model_defaults.embedding_size
    assert args.layers == model_defaults.num_layers
    assert args.epochs == train_defaults.max_epochs
    assert args.lr == train_defaults.learning_rate
    assert args.batch_size == train_defaults.batch_size
    assert args.patience == train_defaults.patience
    assert args.seed == train_defaults.seed
    assert args.max_minutes == train_defaults.max_minutes
    assert args.conversion_weight == train_defaults.conversion_weight

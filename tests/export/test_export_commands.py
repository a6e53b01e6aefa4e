"""The train report, and the quality and search commands, on tiny generated data."""

from __future__ import annotations

import csv
import json

import pytest

from export.__main__ import main
from export.search import choose_trials

GENRE_FLAGS = 19


def write_movielens(folder, users: int = 30, events: int = 10, items: int = 12):
    """A MovieLens-100K-shaped folder: users walk an item cycle; u.item gives genres and years."""
    folder.mkdir(parents=True)
    ratings = [
        f"{user + 1}\t{(user * 5 + step) % items + 1}\t{step % 5 + 1}\t{1000 + step}"
        for user in range(users)
        for step in range(events)
    ]
    (folder / "u.data").write_text("\n".join(ratings) + "\n", encoding="ascii")
    rows = []
    for item in range(1, items + 1):
        flags = ["0"] * GENRE_FLAGS
        flags[item % GENRE_FLAGS] = "1"
        rows.append(f"{item}|Film {item} (199{item % 10})|01-Jan-199{item % 10}||http://example.invalid|" + "|".join(flags))
    (folder / "u.item").write_text("\n".join(rows) + "\n", encoding="latin-1")
    return folder


TINY = ["--hidden-size", "8", "--embedding-size", "4", "--batch-size", "8", "--patience", "3"]


def test_train_writes_report_and_history(tmp_path, capsys):
    data = write_movielens(tmp_path / "ml-100k")
    out_dir = tmp_path / "bundle"

    status = main([
        "train", "--data", str(data), "--out", str(out_dir), "--epochs", "2", "--k", "3", "--quiet",
        "--cell", "lstm", "--item-features", "on", "--event-value", "on", *TINY,
    ])
    printed = capsys.readouterr().out

    assert status == 0
    # 12 genres (one per item) and 10 release years (1990 to 1999).
    assert "inputs: 22 item features, event values" in printed
    assert (out_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [record["epoch"] for record in metrics["training"]["history"]] == [1, 2]
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["cell"] == "lstm"
    assert len(manifest["item_features"]) == 22
    assert {"genre=Action", "release=1991"} <= set(manifest["item_features"])
    assert manifest["inputs"]["value"] == "event_value"


def test_train_with_checkpoints_then_resume(tmp_path, capsys):
    data = write_movielens(tmp_path / "ml-100k")
    checkpoints = tmp_path / "checkpoints"
    common = ["train", "--data", str(data), "--k", "3", "--quiet", "--no-report", "--checkpoint-dir", str(checkpoints), *TINY]

    assert main([*common, "--out", str(tmp_path / "first"), "--epochs", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "second"), "--epochs", "2", "--resume"]) == 0

    manifest = json.loads((tmp_path / "second" / "manifest.json").read_text())
    assert manifest["training_run"]["epochs_run"] == 2
    assert (checkpoints / "best.pt").is_file()


def test_quality_reports_seeds_and_mean(tmp_path, capsys):
    data = write_movielens(tmp_path / "ml-100k")
    json_path = tmp_path / "quality.json"

    status = main([
        "quality", "--data", str(data), "--seeds", "1", "2", "--variants", "gru", "lstm", "--epochs", "1",
        "--json", str(json_path), *TINY,
    ])
    printed = capsys.readouterr().out

    assert status == 0
    document = json.loads(json_path.read_text())
    assert [(run["variant"], run["seed"]) for run in document["runs"]] == [("gru", 1), ("gru", 2), ("lstm", 1), ("lstm", 2)]
    gru = document["summary"]["gru"]["ndcg@10"]
    assert gru["mean"] == pytest.approx(sum(gru["values"]) / 2)
    assert f"{gru['mean']:.4f} ± {gru['std']:.4f}" in printed
    assert "lstm seed 2: test ndcg@10" in printed
    assert "last_item_cooccurrence" in printed
    assert "RecBole GRU4Rec (reference)" in printed
    assert "lstm / gru mean NDCG@10" in printed


def test_search_picks_best_by_validation(tmp_path, capsys):
    data = write_movielens(tmp_path / "ml-100k")
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"loss": ["cross_entropy", "bpr_max"], "lr": [0.01, 0.0001]}))
    out_dir = tmp_path / "search"

    status = main([
        "search", "--data", str(data), "--trials", "3", "--space", str(space), "--out", str(out_dir), "--epochs", "2", *TINY,
    ])

    assert status == 0
    trials = [json.loads(line) for line in (out_dir / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3
    assert all({"valid", "test", "settings"} <= set(trial) for trial in trials)
    best = json.loads((out_dir / "best.json").read_text())
    assert best["valid"]["ndcg@10"] == max(trial["valid"]["ndcg@10"] for trial in trials)
    with (out_dir / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["trial"] for row in rows] == ["1", "2", "3"]
    assert "test_ndcg@10" in rows[0]


def test_search_space_with_unknown_option_is_rejected(tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_speed": [1, 2]}))

    status = main(["search", "--data", str(tmp_path), "--space", str(space), "--out", str(tmp_path / "out")])

    assert status == 1
    assert "'learning_speed' is not a model option" in capsys.readouterr().err


def test_choose_trials_grid_and_random():
    space = {"a": [1, 2], "b": ["x", "y", "z"]}

    grid = choose_trials(space, 4, "grid", seed=0)
    drawn = choose_trials(space, 10, "random", seed=0)

    assert grid == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 1, "b": "z"}, {"a": 2, "b": "x"}]
    assert len(drawn) == 6
    assert len({tuple(trial.items()) for trial in drawn}) == 6
    assert choose_trials(space, 3, "random", seed=5) == choose_trials(space, 3, "random", seed=5)

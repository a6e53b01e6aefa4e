"""``python -m export search``: a budget of trials over a hyperparameter space.

Each trial overrides some model options (the rest keep the values given on the command
line), trains with early stopping on validation NDCG@10 and is evaluated on validation
and test. Every trial is appended to ``trials.jsonl`` and ``trials.csv`` as it finishes.
The best trial is chosen by validation NDCG@10 alone and written to ``best.json``; its
test figures are reported but never used for the choice.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

from export.data import DatasetError

# Option name (as in the Namespace) -> candidate values.
DEFAULT_SPACE: dict[str, list[Any]] = {
    "hidden_size": [64, 128, 256],
    "layers": [1, 2],
    "loss": ["cross_entropy", "sampled_cross_entropy", "bpr_max"],
    "lr": [0.002, 0.004, 0.008],
    "embedding_dropout": [0.2, 0.3, 0.4, 0.5],
    "hidden_dropout": [0.2, 0.3, 0.4, 0.5],
    "negatives": [64, 256, 1024],
}
CSV_METRICS = ("valid_ndcg@10", "valid_recall@10", "test_ndcg@10", "test_recall@10", "test_mrr@10")


def load_space(path: Path | None, args: argparse.Namespace) -> dict[str, list[Any]]:
    """Read a {option: [values]} JSON space, or return the default one."""
    if path is None:
        return DEFAULT_SPACE
    try:
        space = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"Search space file {path} not found.") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"Search space file {path} is not valid JSON: {error}.") from None

    if not isinstance(space, dict) or not space:
        raise DatasetError(f"Search space {path} must be a non-empty JSON object of option: [values].")
    for option, values in space.items():
        if not hasattr(args, option):
            known = ", ".join(sorted(DEFAULT_SPACE))
            raise DatasetError(f"Search space {path}: {option!r} is not a model option; use names such as {known}.")
        if not isinstance(values, list) or not values:
            raise DatasetError(f"Search space {path}: {option!r} needs a non-empty list of values, got {values!r}.")
    return space


def choose_trials(space: dict[str, list[Any]], trials: int, strategy: str, seed: int) -> list[dict[str, Any]]:
    """Return up to ``trials`` distinct settings: the grid in order, or random draws without repeats."""
    options = list(space)
    grid = [dict(zip(options, values)) for values in itertools.product(*(space[option] for option in options))]
    if strategy == "grid":
        return grid[:trials]
    return random.Random(seed).sample(grid, min(trials, len(grid)))


def run_search(args: argparse.Namespace) -> int:
    from export.__main__ import build_configs, load_split
    from export.evaluate import evaluate_model
    from export.train import train_model

    space = load_space(args.space, args)
    log, dataset = load_split(args)
    settings = choose_trials(space, args.trials, args.strategy, args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path, csv_path = out_dir / "trials.jsonl", out_dir / "trials.csv"
    jsonl_path.write_text("", encoding="utf-8")
    print(f"search: {len(settings)} {args.strategy} trials over {', '.join(space)}; results in {out_dir}")

    trials = []
    for number, overrides in enumerate(settings, start=1):
        trial_args = argparse.Namespace(**{**vars(args), **overrides})
        model_config, train_config = build_configs(trial_args, dataset)
        started = time.monotonic()
        result = train_model(dataset, model_config, train_config, show_progress=False)
        trial = {
            "trial": number,
            "settings": overrides,
            "valid": result.best_valid_metrics,
            "test": evaluate_model(result.model, dataset, "test"),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "train_minutes": (time.monotonic() - started) / 60,
        }
        trials.append(trial)
        with jsonl_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(trial) + "\n")
        _write_csv(csv_path, trials, list(space))
        print(
            f"  trial {number}: {overrides} -> valid ndcg@10 {trial['valid']['ndcg@10']:.4f}, "
            f"test ndcg@10 {trial['test']['ndcg@10']:.4f}, {trial['train_minutes']:.1f} min",
            flush=True,
        )

    best = max(trials, key=lambda trial: trial["valid"]["ndcg@10"])
    (out_dir / "best.json").write_text(json.dumps(best, indent=2) + "\n", encoding="utf-8")
    print(
        f"search: best by valid ndcg@10 is trial {best['trial']} {best['settings']}: valid {best['valid']['ndcg@10']:.4f}, "
        f"test {best['test']['ndcg@10']:.4f}"
    )
    return 0


def _write_csv(path: Path, trials: list[dict[str, Any]], options: list[str]) -> None:
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["trial", *options, *CSV_METRICS, "best_epoch", "train_minutes"])
        for trial in trials:
            metrics = [trial[part][metric] for part, metric in (name.split("_", 1) for name in CSV_METRICS)]
            writer.writerow(
                [trial["trial"], *(trial["settings"][option] for option in options), *metrics, trial["best_epoch"],
                 round(trial["train_minutes"], 2)]
            )

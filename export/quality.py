"""``python -m export quality``: train per seed and variant, print test metrics beside references.

Every run uses the model options given (the defaults unless overridden) with the
variant's cell and the run's seed, keeps the checkpoint with the best validation NDCG@10
and is evaluated once on test. The summary gives each variant's mean ± sample standard
deviation over seeds, beside the baselines on the same split and the reference points.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import time
from pathlib import Path
from typing import Any

from export.report import REFERENCE_DATASET, REFERENCE_POINTS, REFERENCE_SPREAD

SUMMARY_METRICS = ("ndcg@10", "recall@10", "mrr@10", "ndcg@20", "recall@20")

# The split and settings for runs in worker processes; set before the pool forks.
_shared: dict[str, Any] = {}


def run_quality(args: argparse.Namespace) -> int:
    from export.__main__ import load_split
    from export.evaluate import evaluate_baselines

    log, dataset = load_split(args)
    _shared.update(args=args, dataset=dataset)
    runs_to_do = [(variant, seed) for variant in args.variants for seed in args.seeds]
    print(f"quality: {len(runs_to_do)} trainings ({', '.join(args.variants)} x seeds {args.seeds}), {args.jobs} at a time")

    started = time.monotonic()
    runs = []
    for run in _run_all(runs_to_do, args.jobs):
        runs.append(run)
        test = run["test"]
        print(
            f"  {run['variant']} seed {run['seed']}: test ndcg@10 {test['ndcg@10']:.4f} recall@10 {test['recall@10']:.4f} "
            f"mrr@10 {test['mrr@10']:.4f}, valid ndcg@10 {run['valid_ndcg@10']:.4f}, best epoch {run['best_epoch']} "
            f"of {run['epochs_run']}, {run['train_minutes']:.1f} min",
            flush=True,
        )
    runs.sort(key=lambda run: (args.variants.index(run["variant"]), args.seeds.index(run["seed"])))

    baselines = {name: figures["test"] for name, figures in evaluate_baselines(dataset, "test").items()}
    summary = summarise(runs)
    references = REFERENCE_POINTS if log.name == REFERENCE_DATASET else {}
    print_summary(summary, baselines, references, len(dataset.users))
    print(f"quality: {len(runs)} trainings in {(time.monotonic() - started) / 60:.1f} min wall-clock")

    if args.json is not None:
        document = {
            "dataset": log.name,
            "seeds": args.seeds,
            "variants": args.variants,
            "users": len(dataset.users),
            "runs": runs,
            "summary": summary,
            "baselines": baselines,
            "reference_points": references,
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        print(f"quality: figures written to {args.json}")
    return 0


def _run_all(runs_to_do: list[tuple[str, int]], jobs: int):
    if jobs == 1:
        for variant, seed in runs_to_do:
            yield train_one(variant, seed)
        return
    # Fork shares the loaded split with the workers, so each does not load the data again.
    context = multiprocessing.get_context("fork")
    with context.Pool(processes=jobs, initializer=_limit_threads) as pool:
        yield from pool.imap_unordered(_train_one_packed, runs_to_do)


def _limit_threads() -> None:
    import torch

    # Parallel trainings on few cores run faster with one thread each than fighting over threads.
    torch.set_num_threads(1)


def _train_one_packed(job: tuple[str, int]) -> dict[str, Any]:
    return train_one(*job)


def train_one(variant: str, seed: int) -> dict[str, Any]:
    """Train one variant with one seed on the shared split and return its figures."""
    from export.__main__ import build_configs
    from export.evaluate import evaluate_model
    from export.train import train_model

    args = argparse.Namespace(**{**vars(_shared["args"]), "cell": variant, "seed": seed})
    dataset = _shared["dataset"]
    model_config, train_config = build_configs(args, dataset)

    started = time.monotonic()
    result = train_model(dataset, model_config, train_config, show_progress=False)
    train_minutes = (time.monotonic() - started) / 60
    return {
        "variant": variant,
        "seed": seed,
        "test": evaluate_model(result.model, dataset, "test"),
        "valid_ndcg@10": result.best_valid_metrics["ndcg@10"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_because": result.stopped_because,
        "train_minutes": train_minutes,
        "model_config": model_config.to_dict(),
        "train_config": train_config.to_dict(),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Return {variant: {metric: {"mean", "std", "values"}}}; std is the sample deviation (0 for one run)."""
    summary: dict[str, dict[str, Any]] = {}
    for variant in dict.fromkeys(run["variant"] for run in runs):
        chosen = [run for run in runs if run["variant"] == variant]
        figures: dict[str, Any] = {}
        for metric in SUMMARY_METRICS:
            figures[metric] = _spread([run["test"][metric] for run in chosen])
        figures["train_minutes"] = _spread([run["train_minutes"] for run in chosen])
        figures["seeds"] = [run["seed"] for run in chosen]
        summary[variant] = figures
    return summary


def _spread(values: list[float]) -> dict[str, Any]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": values}


def print_summary(
    summary: dict[str, dict[str, Any]],
    baselines: dict[str, dict[str, float]],
    references: dict[str, dict[str, float]],
    num_users: int,
) -> None:
    print(f"test metrics, {num_users} users, full ranking, seen items excluded (mean ± std over seeds):")
    header = f"{'model':<32}{'NDCG@10':>18}{'Recall@10':>18}{'MRR@10':>18}{'train min':>14}"
    print(header)
    for variant, figures in summary.items():
        cells = "".join(f"{_format(figures[metric]):>18}" for metric in ("ndcg@10", "recall@10", "mrr@10"))
        print(f"{variant + ' (ours, ' + str(len(figures['seeds'])) + ' seeds)':<32}{cells}{figures['train_minutes']['mean']:>14.1f}")
    for name, figures in baselines.items():
        cells = "".join(f"{figures[metric]:>18.4f}" for metric in ("ndcg@10", "recall@10", "mrr@10"))
        print(f"{name:<32}{cells}")
    for name, figures in references.items():
        spread = REFERENCE_SPREAD.get(name, {})
        cells = ""
        for metric in ("ndcg@10", "recall@10", "mrr@10"):
            text = "-" if metric not in figures else f"{figures[metric]:.3f}"
            if metric in spread:
                text += f" ± {spread[metric]:.3f}"
            cells += f"{text:>18}"
        print(f"{name + ' (reference)':<32}{cells}")

    if "gru" in summary and "lstm" in summary:
        ratio = summary["lstm"]["ndcg@10"]["mean"] / summary["gru"]["ndcg@10"]["mean"]
        print(f"lstm / gru mean NDCG@10: {ratio:.3f}")


def _format(spread: dict[str, Any]) -> str:
    return f"{spread['mean']:.4f} ± {spread['std']:.4f}"

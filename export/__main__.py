"""Command line: ``python -m export {train,evaluate,download}``.

User errors (a missing dataset, a bad bundle, an invalid option) print one sentence to
stderr and exit with status 1, or 2 for option errors found by argparse.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from export.data import (
    MOVIELENS_100K,
    MOVIELENS_100K_URL,
    DatasetError,
    default_cache_dir,
    download_movielens,
    fingerprint_dataset,
    load_item_titles,
    load_movielens,
    resolve_dataset_dir,
)

TABLE_METRICS = ("recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "mrr@20", "coverage@10", "coverage@20")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate, export and write a model bundle")
    train.add_argument("--data", help="dataset folder, or a folder containing ml-100k/ (default: see `download`)")
    train.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced if it is a bundle)")
    train.add_argument("--epochs", type=positive_int, default=40, help="maximum training epochs (default 40)")
    train.add_argument("--hidden-size", type=positive_int, default=128, help="GRU hidden state size (default 128)")
    train.add_argument("--embedding-size", type=positive_int, default=64, help="item and event-type embedding size (default 64)")
    train.add_argument("--layers", type=positive_int, default=1, help="stacked GRU layers (default 1)")
    train.add_argument("--k", type=positive_int, default=20, help="items the step graph returns per event (default 20)")
    train.add_argument("--seed", type=int, default=42, help="seed for weights, batching and dropout (default 42)")
    train.add_argument("--lr", type=positive_float, default=4e-3, help="Adam learning rate (default 0.004)")
    train.add_argument("--batch-size", type=positive_int, default=32, help="user sequences per batch (default 32)")
    train.add_argument("--patience", type=positive_int, default=8, help="epochs without a better valid NDCG@10 before stopping (default 8)")
    train.add_argument("--max-minutes", type=positive_float, help="wall-clock limit for training, in minutes (default none)")
    train.add_argument("--quiet", action="store_true", help="hide the progress bar and per-epoch lines")

    evaluate = commands.add_parser("evaluate", help="evaluate a bundle's model and the baselines on a dataset")
    evaluate.add_argument("--bundle", required=True, type=Path, help="bundle directory written by `train`")
    evaluate.add_argument("--data", help="dataset folder, or a folder containing ml-100k/")

    download = commands.add_parser("download", help="download and unpack MovieLens-100K into the cache")
    download.add_argument(
        "--cache", type=Path, help="cache folder (default $STREAMREC_CACHE_DIR or ~/.cache/streamrec)"
    )
    download.add_argument("--url", default=MOVIELENS_100K_URL, help=f"zip to fetch (default {MOVIELENS_100K_URL})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # Imported late: exception types only, so `download` never loads torch.
    user_errors: tuple[type[Exception], ...] = (DatasetError,)
    if args.command in ("train", "evaluate"):
        from export.bundle import BundleError
        from export.onnx_export import ExportError
        from export.parity import ParityError

        user_errors += (BundleError, ExportError, ParityError)

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        return run_download(args)
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run_download(args: argparse.Namespace) -> int:
    cache_dir = args.cache or default_cache_dir()
    dataset_dir = download_movielens(cache_dir, url=args.url)
    print(f"{MOVIELENS_100K} is in {dataset_dir}")
    return 0


def load_split(data_arg: str | None, vocabulary=None):
    from export.sequences import split_leave_one_out

    dataset_dir = resolve_dataset_dir(data_arg)
    interactions = load_movielens(dataset_dir)
    dataset = split_leave_one_out(interactions, vocabulary)
    users = len(dataset.users) + len(dataset.skipped_users)
    print(
        f"data: {dataset_dir}: {len(interactions)} interactions, {users} users, "
        f"{dataset.num_items - 1} items; {len(dataset.users)} users split "
        f"({len(dataset.skipped_users)} with fewer than 3 interactions left out)"
    )
    return dataset_dir, dataset


def run_train(args: argparse.Namespace) -> int:
    from export.bundle import write_bundle
    from export.evaluate import evaluate_all
    from export.model import ModelConfig
    from export.onnx_export import ExportError
    from export.train import TrainConfig, train_model

    dataset_dir, dataset = load_split(args.data)
    model_config = ModelConfig(
        num_items=dataset.num_items,
        embedding_size=args.embedding_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
    )
    train_config = TrainConfig(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        seed=args.seed,
        max_minutes=args.max_minutes,
    )
    if not 1 <= args.k < dataset.num_items:
        raise ExportError(f"--k {args.k} is larger than the {dataset.num_items - 1} items in the dataset; lower --k.")

    result = train_model(dataset, model_config, train_config, show_progress=not args.quiet)
    print(
        f"training: best epoch {result.best_epoch} of {len(result.history)} "
        f"(stopped: {result.stopped_because}), {result.seconds:.0f} s"
    )

    metrics = evaluate_all(result.model, dataset)
    print_metrics_table(metrics, len(dataset.users))

    titles = load_item_titles(dataset_dir) if (dataset_dir / "u.item").exists() else {}
    training_data = {
        "dataset": MOVIELENS_100K,
        "fingerprint": fingerprint_dataset(dataset_dir),
        "interactions": dataset.num_interactions,
        "users": len(dataset.users) + len(dataset.skipped_users),
    }
    run_summary = {
        "training_run": {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_because": result.stopped_because,
            "train_seconds": round(result.seconds, 1),
        }
    }
    bundle = write_bundle(
        args.out,
        result.model,
        dataset.vocabulary,
        titles,
        metrics,
        train_config={"model": model_config.to_dict(), "training": train_config.to_dict()},
        training_data=training_data,
        k=args.k,
        extra_manifest=run_summary,
    )

    parity = bundle.parity
    print(
        f"parity: hidden max abs diff {parity.hidden_max_abs_diff:.2e}, scores max abs diff "
        f"{parity.scores_max_abs_diff:.2e}, {parity.topk_tie_swaps} tie swaps in "
        f"{parity.topk_positions_compared} top-k positions ({parity.random_batches} random batches, "
        f"{parity.chained_steps} chained steps, tolerance {parity.tolerance:g})"
    )
    print(f"bundle: {bundle.path.resolve()}")
    print(f"model_version: {bundle.model_version}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from export.bundle import load_pytorch_model
    from export.evaluate import evaluate_all
    from export.sequences import ItemVocabulary

    bundle = load_pytorch_model(args.bundle)
    vocabulary = ItemVocabulary(bundle.item_ids[1:])
    dataset_dir, dataset = load_split(args.data, vocabulary)

    expected = bundle.manifest.get("training_data", {}).get("fingerprint")
    if expected and expected != fingerprint_dataset(dataset_dir):
        print(
            f"note: {dataset_dir} differs from the data this bundle was trained on "
            "(fingerprint mismatch), so these figures are not the bundle's own."
        )

    started = time.monotonic()
    metrics = evaluate_all(bundle.model, dataset)
    print(f"bundle: {args.bundle} (model_version {bundle.manifest['model_version']})")
    print_metrics_table(metrics, len(dataset.users))
    print(f"valid ndcg@10 {metrics['model']['valid']['ndcg@10']:.4f}; evaluated in {time.monotonic() - started:.1f} s")
    return 0


def print_metrics_table(metrics: dict, num_users: int) -> None:
    columns = {
        "model": metrics["model"]["test"],
        "popularity": metrics["baselines"]["popularity"]["test"],
        "last_item_cooccurrence": metrics["baselines"]["last_item_cooccurrence"]["test"],
    }
    print(f"test metrics, {num_users} users, full ranking, seen items excluded:")
    print(f"{'metric':<12}" + "".join(f"{name:>24}" for name in columns))
    for metric in TABLE_METRICS:
        print(f"{metric:<12}" + "".join(f"{values[metric]:>24.4f}" for values in columns.values()))


if __name__ == "__main__":
    sys.exit(main())

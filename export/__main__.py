"""Command line: ``python -m export {train,evaluate,tradeoff,quality,search,download}``.

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
    resolve_dataset_dir,
)
from export.formats import FORMATS, LoadedLog, load_event_log, parse_columns

# The default configuration's optional inputs; quality and search start from the same defaults.
DEFAULT_ITEM_FEATURES = "on"
DEFAULT_EVENT_VALUE = "on"

# Graph top-k width that `train` writes unless --candidates sets another.
DEFAULT_CANDIDATES = 100

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


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not a non-negative integer")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number >= 0")
    return value


def dropout_rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a dropout rate in [0, 1)")
    return value


def column_mapping(text: str) -> dict[str, str]:
    try:
        return parse_columns(text)
    except DatasetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_data_options(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--data",
        help="MovieLens folder (ml-100k, or ML-1M/10M with ratings.dat), a folder containing ml-100k/, "
        "or an event-log file (default: see `download`)",
    )
    command.add_argument("--format", choices=FORMATS, default="auto", help="event-log format (default: detected from --data)")
    command.add_argument(
        "--columns",
        type=column_mapping,
        help="column mapping for a CSV or Parquet log, e.g. user=uid,item=sku,time=ts,type=action,value=rating",
    )
    command.add_argument("--time-unit", choices=("s", "ms"), default="s", help="unit of numeric times in a log file (default s)")
    command.add_argument(
        "--max-bad-rows", type=non_negative_int, default=0,
        help="bad rows to leave out before loading fails (default 0: any bad row is an error)",
    )


def add_model_options(command: argparse.ArgumentParser) -> None:
    """Options that set the model and its training; their defaults are the default configuration."""
    command.add_argument("--epochs", type=positive_int, default=40, help="maximum training epochs (default 40)")
    command.add_argument("--cell", choices=("gru", "lstm"), default="gru", help="recurrent cell (default gru)")
    command.add_argument("--hidden-size", type=positive_int, default=128, help="hidden state size (default 128)")
    command.add_argument("--embedding-size", type=positive_int, default=64, help="item and event-type embedding size (default 64)")
    command.add_argument("--layers", type=positive_int, default=1, help="stacked recurrent layers (default 1)")
    command.add_argument(
        "--tied-embeddings", action="store_true",
        help="score items with the input item embedding instead of a separate output embedding",
    )
    command.add_argument("--embedding-dropout", type=dropout_rate, default=0.4, help="dropout on the input vector (default 0.4)")
    command.add_argument("--hidden-dropout", type=dropout_rate, default=0.4, help="dropout on the cell outputs (default 0.4)")

    command.add_argument(
        "--item-features", choices=("on", "off"), default=DEFAULT_ITEM_FEATURES,
        help=f"embed item side features (genres, release year, categories) when the data has them (default {DEFAULT_ITEM_FEATURES})",
    )
    command.add_argument(
        "--event-value", choices=("on", "off"), default=DEFAULT_EVENT_VALUE,
        help=f"feed each event's value (the rating) to the model as an input (default {DEFAULT_EVENT_VALUE})",
    )

    command.add_argument(
        "--no-conversion-head", action="store_true",
        help="train without the conversion head (the probability that an interaction with an item is strong)",
    )
    command.add_argument(
        "--conversion-weight", type=non_negative_float, default=1.0,
        help="weight of the conversion head's binary cross-entropy beside the next-item loss; 0 is allowed (default 1.0)",
    )
    command.add_argument(
        "--conversion-shares-encoder", action="store_true",
        help="let the conversion loss train the embeddings and the recurrent cell as well as the head "
        "(default: the head alone, which keeps next-item quality that of a model without the head)",
    )

    command.add_argument("--method", choices=("sequence", "session_parallel"), default="sequence", help="mini-batch method (default sequence)")
    command.add_argument(
        "--loss", choices=("cross_entropy", "sampled_cross_entropy", "bpr_max"), default="cross_entropy",
        help="training loss (default cross_entropy over the full catalogue)",
    )
    command.add_argument(
        "--negatives", type=non_negative_int, default=256,
        help="popularity-weighted negatives per batch for the sampled losses, beside the batch's targets (default 256)",
    )
    command.add_argument("--negative-alpha", type=float, default=0.75, help="popularity exponent for drawing negatives (default 0.75)")
    command.add_argument("--bpr-max-regularization", type=float, default=1.0, help="BPR-max score penalty weight (default 1.0)")

    command.add_argument("--seed", type=int, default=42, help="seed for weights, batching, negatives and dropout (default 42)")
    command.add_argument("--lr", type=positive_float, default=4e-3, help="Adam learning rate (default 0.004)")
    command.add_argument("--batch-size", type=positive_int, default=32, help="user sequences (or session-parallel slots) per batch (default 32)")
    command.add_argument("--patience", type=positive_int, default=8, help="epochs without a better valid NDCG@10 before stopping (default 8)")
    command.add_argument("--max-minutes", type=positive_float, help="wall-clock limit for training, in minutes (default none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate, export and write a model bundle")
    add_data_options(train)
    train.add_argument("--out", required=True, type=Path, help="bundle directory to write (replaced if it is a bundle)")
    add_model_options(train)
    train.add_argument(
        "--candidates", "--k", dest="candidates", type=positive_int,
        help=f"candidates the step graph returns per event, for the worker to re-rank; --k is an alias "
        f"(default {DEFAULT_CANDIDATES}, or every known item when the data has fewer)",
    )
    train.add_argument("--checkpoint-dir", type=Path, help="folder for best.pt (best weights) and last.pt (resumable state)")
    train.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir/last.pt when it exists")
    train.add_argument("--no-report", action="store_true", help="skip report.png in the bundle")
    train.add_argument("--quiet", action="store_true", help="hide the progress bar and per-epoch lines")

    evaluate = commands.add_parser("evaluate", help="evaluate a bundle's model and the baselines on a dataset")
    evaluate.add_argument("--bundle", required=True, type=Path, help="bundle directory written by `train`")
    add_data_options(evaluate)

    tradeoff = commands.add_parser(
        "tradeoff", help="sweep blends of preference, conversion and live popularity over a bundle's test candidates"
    )
    tradeoff.add_argument("--bundle", required=True, type=Path, help="bundle directory written by `train`")
    add_data_options(tradeoff)
    tradeoff.add_argument(
        "--half-life-s", type=positive_float, default=None,
        help="half-life of live popularity counts, in seconds (default: the worker's, 86400)",
    )
    tradeoff.add_argument(
        "--grid", nargs="+", metavar="OBJECTIVE=W1,W2",
        help="blend weights to sweep, e.g. preference=1 conversion=0,0.5,1 popularity=0,1; an objective left out "
        "gets preference=1, conversion=0, popularity=0 (default: preference 1, conversion and popularity "
        "each 0, 0.25, 0.5, 1, 2)",
    )
    tradeoff.add_argument("--json", type=Path, help="write the rows, one per blend, to this JSON file")
    tradeoff.add_argument("--png", type=Path, help="draw NDCG@10 against strong precision and popularity bias into this PNG")

    quality = commands.add_parser(
        "quality", help="train the default configuration per seed and variant, and print test metrics beside the references"
    )
    add_data_options(quality)
    quality.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds to train (default 42 43 44)")
    quality.add_argument(
        "--variants", nargs="+", choices=("gru", "lstm"), default=["gru", "lstm"],
        help="cells to train with otherwise default settings (default gru lstm)",
    )
    quality.add_argument("--jobs", type=positive_int, default=1, help="trainings run at once, one thread each (default 1)")
    quality.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_model_options(quality)

    search = commands.add_parser("search", help="random or grid search over hyperparameters, best picked by validation NDCG@10")
    add_data_options(search)
    search.add_argument("--trials", type=positive_int, default=8, help="number of trials (default 8)")
    search.add_argument("--strategy", choices=("random", "grid"), default="random", help="how trials are chosen (default random)")
    search.add_argument("--space", type=Path, help="JSON file {option: [values]} replacing the default search space")
    search.add_argument("--out", type=Path, required=True, help="folder for trials.jsonl, trials.csv and best.json")
    add_model_options(search)

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
    if args.command in ("train", "evaluate", "tradeoff", "quality", "search"):
        from export.bundle import BundleError
        from export.onnx_export import ExportError
        from export.parity import ParityError

        user_errors += (BundleError, ExportError, ParityError)
    if args.command == "tradeoff":
        from export.tradeoff import TradeoffError

        user_errors += (TradeoffError,)

    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "evaluate":
            return run_evaluate(args)
        if args.command == "tradeoff":
            from export.tradeoff import run_tradeoff

            return run_tradeoff(args)
        if args.command == "quality":
            from export.quality import run_quality

            return run_quality(args)
        if args.command == "search":
            from export.search import run_search

            return run_search(args)
        return run_download(args)
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def run_download(args: argparse.Namespace) -> int:
    cache_dir = args.cache or default_cache_dir()
    dataset_dir = download_movielens(cache_dir, url=args.url)
    print(f"{MOVIELENS_100K} is in {dataset_dir}")
    return 0


def load_log(args: argparse.Namespace) -> LoadedLog:
    """Load the event log that the data options name, and report left-out bad rows."""
    path = Path(args.data) if args.data is not None else None
    if path is not None and path.suffix and not path.exists():
        raise DatasetError(f"{path} not found; check --data.")
    log_file_or_dat = path is not None and (path.is_file() or (path / "ratings.dat").is_file())
    if args.format in ("auto", "movielens") and not log_file_or_dat:
        path = resolve_dataset_dir(args.data)
    elif path is None:
        raise DatasetError(f"--format {args.format} needs --data, the log file or folder to read.")

    log = load_event_log(path, args.format, args.columns, args.max_bad_rows, args.time_unit)
    if log.bad_rows.count:
        print(f"note: left out {log.bad_rows.summary()}")
    return log


def load_split(args: argparse.Namespace, vocabulary=None):
    from export.sequences import split_leave_one_out

    log = load_log(args)
    dataset = split_leave_one_out(log.interactions, vocabulary, log.item_tags)
    users = len(dataset.users) + len(dataset.skipped_users)
    print(
        f"data: {log.name}: {len(log.interactions)} interactions, {users} users, "
        f"{dataset.num_items - 1} items; {len(dataset.users)} users split "
        f"({len(dataset.skipped_users)} with fewer than 3 interactions left out)"
    )
    return log, dataset


def build_configs(args: argparse.Namespace, dataset):
    """Return (ModelConfig, TrainConfig) from the model options, for this dataset."""
    from export.model import ModelConfig
    from export.train import TrainConfig

    features = dataset.item_features if args.item_features == "on" else None
    model_config = ModelConfig(
        num_items=dataset.num_items,
        cell=args.cell,
        embedding_size=args.embedding_size,
        hidden_size=args.hidden_size,
        num_layers=args.layers,
        tied_embeddings=args.tied_embeddings,
        embedding_dropout=args.embedding_dropout,
        hidden_dropout=args.hidden_dropout,
        num_item_features=0 if features is None else features.num_features,
        use_event_value=args.event_value == "on" and dataset.has_values,
        conversion_head=not getattr(args, "no_conversion_head", False),
    )
    train_config = TrainConfig(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        patience=args.patience,
        seed=args.seed,
        max_minutes=args.max_minutes,
        method=args.method,
        loss=args.loss,
        num_negatives=args.negatives,
        negative_alpha=args.negative_alpha,
        bpr_max_regularization=args.bpr_max_regularization,
        checkpoint_dir=None if getattr(args, "checkpoint_dir", None) is None else str(args.checkpoint_dir),
        resume=getattr(args, "resume", False),
        conversion_weight=getattr(args, "conversion_weight", 1.0),
        conversion_shares_encoder=getattr(args, "conversion_shares_encoder", False),
    )
    return model_config, train_config


def describe_inputs(args: argparse.Namespace, dataset, model_config) -> str:
    """Return a line saying which optional inputs the model uses, and why others are off."""
    parts = []
    if model_config.num_item_features:
        parts.append(f"{model_config.num_item_features} item features")
    elif args.item_features == "on":
        parts.append("no item features (the data has no item metadata)")
    if model_config.use_event_value:
        parts.append("event values")
    elif args.event_value == "on":
        parts.append("no event values (no event has one)")
    return ", ".join(parts) or "item and event type only"


def run_train(args: argparse.Namespace) -> int:
    from export.bundle import categories_from_tags, write_bundle
    from export.evaluate import evaluate_all
    from export.report import training_summary, write_report
    from export.train import train_model

    log, dataset = load_split(args)
    model_config, train_config = build_configs(args, dataset)
    candidates = resolve_candidates(args.candidates, dataset.num_items - 1)
    head = "conversion head" if model_config.conversion_head else "no conversion head"
    print(
        f"model: {model_config.cell}, {model_config.num_layers} layer(s), inputs: "
        f"{describe_inputs(args, dataset, model_config)}; {head}; {candidates} candidates per event"
    )

    result = train_model(dataset, model_config, train_config, show_progress=not args.quiet)
    print(
        f"training: best epoch {result.best_epoch} of {len(result.history)} "
        f"(stopped: {result.stopped_because}), {result.seconds:.0f} s"
    )

    metrics = evaluate_all(result.model, dataset)
    print_metrics_table(metrics, len(dataset.users))
    print_conversion_metrics(metrics)
    metrics["training"] = training_summary(result)

    training_data = {
        "dataset": log.name,
        "fingerprint": log.fingerprint,
        "interactions": dataset.num_interactions,
        "users": len(dataset.users) + len(dataset.skipped_users),
        "bad_rows_left_out": log.bad_rows.count,
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
        log.titles,
        metrics,
        train_config={"model": model_config.to_dict(), "training": train_config.to_dict()},
        training_data=training_data,
        k=candidates,
        extra_manifest=run_summary,
        item_feature_names=dataset.item_features.names if model_config.num_item_features else None,
        item_categories=categories_from_tags(log.item_tags),
    )

    parity = bundle.parity
    print(
        f"parity: hidden max abs diff {parity.hidden_max_abs_diff:.2e}, scores max abs diff "
        f"{parity.scores_max_abs_diff:.2e}, {parity.topk_tie_swaps} tie swaps in "
        f"{parity.topk_positions_compared} top-k positions ({parity.random_batches} random batches, "
        f"{parity.chained_steps} chained steps, tolerance {parity.tolerance:g})"
    )
    if parity.conversion_max_abs_diff is not None:
        print(f"parity: conversion max abs diff {parity.conversion_max_abs_diff:.2e}")
    if not args.no_report:
        print(f"report: {write_report(bundle.path, metrics, dataset=log.name).resolve()}")
    print(f"bundle: {bundle.path.resolve()}")
    print(f"model_version: {bundle.model_version}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from export.bundle import load_pytorch_model
    from export.evaluate import evaluate_all
    from export.sequences import ItemVocabulary

    bundle = load_pytorch_model(args.bundle)
    vocabulary = ItemVocabulary(bundle.item_ids[1:])
    log, dataset = load_split(args, vocabulary)

    expected = bundle.manifest.get("training_data", {}).get("fingerprint")
    if expected and expected != log.fingerprint:
        print(
            f"note: {log.name} differs from the data this bundle was trained on "
            "(fingerprint mismatch), so these figures are not the bundle's own."
        )

    started = time.monotonic()
    metrics = evaluate_all(bundle.model, dataset)
    print(f"bundle: {args.bundle} (model_version {bundle.manifest['model_version']})")
    print_metrics_table(metrics, len(dataset.users))
    print_conversion_metrics(metrics)
    print(f"valid ndcg@10 {metrics['model']['valid']['ndcg@10']:.4f}; evaluated in {time.monotonic() - started:.1f} s")
    return 0


def resolve_candidates(requested: int | None, known_items: int) -> int:
    """Return the graph's top-k width: --candidates, or its default capped at the known items."""
    from export.onnx_export import ExportError

    if requested is None:
        if known_items < DEFAULT_CANDIDATES:
            print(f"note: the data has {known_items} items, fewer than {DEFAULT_CANDIDATES}; the graph returns all of them")
        return min(DEFAULT_CANDIDATES, known_items)
    if requested > known_items:
        raise ExportError(
            f"--candidates {requested} is larger than the {known_items} items in the dataset; lower --candidates."
        )
    return requested


def print_conversion_metrics(metrics: dict) -> None:
    """Print the conversion head's test figures, when the model has the head."""
    test = metrics["model"]["test"]
    if "conversion_log_loss" not in test:
        return
    auc = test["conversion_auc"]
    auc_text = "n/a (the test targets are all strong or all not)" if auc is None else f"{auc:.4f}"
    print(
        f"conversion head at the test item: AUC {auc_text}, log loss {test['conversion_log_loss']:.4f}, "
        f"strong rate {test['strong_rate']:.4f}"
    )


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

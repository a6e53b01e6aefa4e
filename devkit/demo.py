"""End-to-end demo: broker, model, worker, MovieLens replay, recommendations with titles.

    python -m devkit.demo [--data DIR] [--rate EVENTS_PER_S] [--users N] [--retrain]

Everything runs on 127.0.0.1 and is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from devkit.broker import EmbeddedBroker
from devkit.replay import first_users, interaction_events, malformed_messages, replay_events
from devkit.worker_process import TopicCollector, WorkerProcess, worker_env
from worker.config import Settings
from worker.model import BundleError, load_bundle
from worker.create_topics import create_worker_topics

REPO = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO / "artifacts" / "demo"
PARTITIONS = 4
MALFORMED = 12


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="folder containing ml-100k/ (default: $STREAMREC_DATA_DIR, then ../shared/data)")
    parser.add_argument("--bundle", type=Path, default=REPO / "artifacts" / "bundle", help="model bundle to serve or create")
    parser.add_argument("--retrain", action="store_true", help="train a new model even if the bundle exists")
    parser.add_argument("--rate", type=float, default=800.0, help="replay rate in events per second, below the worker's capacity so latency is not queueing; 0 for full speed")
    parser.add_argument("--users", type=int, default=None, help="replay only the first N users (default: all)")
    parser.add_argument("--show", type=int, default=3, help="how many users' recommendations to print")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    logging.getLogger("devkit.replay").setLevel(logging.INFO)
    from export.data import load_item_titles, load_movielens, resolve_dataset_dir

    dataset_dir = resolve_dataset_dir(args.data)
    bundle = _ensure_bundle(args.bundle, dataset_dir, args.retrain)
    model = load_bundle(bundle)
    events = interaction_events(load_movielens(dataset_dir), dataset_dir.name)
    if args.users:
        events = first_users(events, args.users)
    titles = load_item_titles(dataset_dir)
    print(f"demo: model {model.version} ({model.cell_type}, hidden {model.hidden_size}); {len(events)} events to replay")

    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    with EmbeddedBroker(log_path=DEMO_DIR / "broker.log") as broker:
        print(f"demo: broker on {broker.bootstrap}")
        settings = Settings.from_env(
            {},
            bundle_dir=bundle,
            broker=f"kafka://{broker.bootstrap}",
            partitions=PARTITIONS,
            state_dir=DEMO_DIR / f"state-{int(time.time())}",
        )
        create_worker_topics(settings)

        env = {**worker_env(settings), "STREAMREC_LOG_LEVEL": "warning"}
        worker = WorkerProcess(env, DEMO_DIR / "worker.log").start()
        collector = TopicCollector(broker.bootstrap, [settings.recommendations_topic, settings.dead_letter_topic]).start()
        try:
            print("demo: waiting for the worker to join its consumer group (about 40 s on the embedded broker)")
            worker.wait_ready()
            return _replay_and_report(args, broker.bootstrap, settings, events, titles, worker, collector)
        finally:
            collector.stop()
            code = worker.stop()
            print(f"demo: worker stopped with exit code {code}; logs in {DEMO_DIR}")


def _ensure_bundle(bundle: Path, dataset_dir: Path, retrain: bool) -> Path:
    if not retrain:
        try:
            load_bundle(bundle)
            print(f"demo: reusing the model bundle in {bundle} (--retrain to train a new one)")
            return bundle
        except BundleError as exc:
            print(f"demo: no usable bundle in {bundle} ({exc.__class__.__name__}); training one")
    command = [sys.executable, "-m", "export", "train", "--data", str(dataset_dir), "--out", str(bundle)]
    print("demo: $ " + " ".join(command[1:]))
    subprocess.run(command, check=True)
    return bundle


def _replay_and_report(args, bootstrap, settings, events, titles, worker, collector) -> int:
    bad = malformed_messages(MALFORMED)
    print(f"demo: replaying {len(events)} MovieLens events and {len(bad)} malformed ones at "
          f"{'full speed' if not args.rate else f'{args.rate:.0f} events/s'}")
    started = time.monotonic()
    stats = replay_events(
        bootstrap, settings.events_topic, events, rate=args.rate or None, malformed=bad, malformed_every=len(events) // len(bad)
    )
    if not stats.ok:
        print(f"demo: replay failed: {stats.failed} delivery errors, {stats.undelivered} undelivered; {stats.errors[:3]}")
        return 1

    recommendations = collector.wait_for(settings.recommendations_topic, len(events), timeout_s=600, idle_timeout_s=60)
    dead_letters = collector.wait_for(settings.dead_letter_topic, len(bad), timeout_s=30)
    elapsed = time.monotonic() - started
    print(f"demo: worker caught up in {elapsed:.1f} s ({recommendations / elapsed:.0f} recommendations/s)")

    records = collector.snapshot(settings.recommendations_topic)
    latest: dict[str, dict] = {}
    latencies_ms = []
    for record in records:
        body = json.loads(record.value)
        latest[body["user_id"]] = body
        latencies_ms.append(record.timestamp_ms - body["event_kafka_timestamp_ms"])

    _print_users(events, latest, titles, args.show)
    p50, p99 = np.percentile(latencies_ms, [50, 99]) if latencies_ms else (float("nan"), float("nan"))
    print(f"demo: events={len(events) + len(bad)} recommendations={recommendations} "
          f"dead_letters={dead_letters} p50_ms={p50:.1f} p99_ms={p99:.1f}")
    return 0 if recommendations >= len(events) and dead_letters >= len(bad) else 1


def _print_users(events: list[dict], latest: dict[str, dict], titles: dict[str, str], count: int) -> None:
    history: dict[str, list[str]] = {}
    for event in events:
        history.setdefault(str(event["user_id"]), []).append(str(event["item_id"]))
    for user_id in sorted(latest, key=lambda u: (len(u), u))[:count]:
        body = latest[user_id]
        watched = ", ".join(titles.get(item, item) for item in history.get(user_id, [])[-3:])
        print(f"\nuser {user_id} — {body['events_absorbed']} events absorbed; last rated: {watched}")
        for rank, item in enumerate(body["items"][:10], start=1):
            print(f"  {rank:2d}. {titles.get(item['item_id'], item['item_id'])}  ({item['score']:.2f})")
    print()


if __name__ == "__main__":
    sys.exit(main())

"""Run the worker: `python -m worker` (settings from STREAMREC_* environment variables)."""

from __future__ import annotations

import argparse
import logging.config
import signal
import sys

from worker.config import ENV_PREFIX, Settings, SettingsError
from worker.logs import logging_config
from worker.model import BundleError, load_bundle
from worker.processor import check_model_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker",
        description="Consume user events, apply one recurrent step per event, publish top-K recommendations.",
        epilog="Every setting is an environment variable; run with --settings to list them.",
    )
    parser.add_argument("--settings", action="store_true", help="print every setting with its default and exit")
    parser.add_argument("--check", action="store_true", help="load the settings and the model bundle, then exit")
    args = parser.parse_args(argv)

    if args.settings:
        print(Settings.describe())
        return 0

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))

    try:
        model = load_bundle(settings.bundle_dir, threads=settings.ort_threads, optimization=settings.ort_optimization)
        check_model_settings(settings, model)
    except BundleError as exc:
        print(f"worker: cannot serve the model bundle: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"worker: settings and model bundle {model.version} are valid")
        return 0

    return _run(settings, model)


def _run(settings: Settings, model) -> int:
    # Imported here so that --settings and --check work without starting faust's machinery.
    from worker.app import create_app
    from worker.create_topics import create_worker_topics
    from worker.shutdown import GracefulWorker
    from worker.topics import TopicSetupError, wait_for_broker

    # Until faust installs its own handlers, SIGTERM ends the wait with status 0.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    wait_for_broker(settings.bootstrap_servers)
    signal.signal(signal.SIGTERM, previous)

    if settings.create_topics:
        try:
            create_worker_topics(settings)
        except TopicSetupError as exc:
            print(f"worker: topic setup failed: {exc}", file=sys.stderr)
            return 2

    try:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"worker: cannot create the state directory {ENV_PREFIX}STATE_DIR={settings.state_dir}: {exc}", file=sys.stderr)
        return 2

    components = create_app(settings, model)
    worker = GracefulWorker(
        components.app,
        components.tracker,
        settings.shutdown_timeout_s,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level, settings.log_format),
        redirect_stdouts=False,
    )
    # faust's terminal spinner sets the root logger to DEBUG, which makes every library
    # build a log record per message it sends (about 9% of CPU time at warning level).
    worker.spinner = None
    worker.execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())

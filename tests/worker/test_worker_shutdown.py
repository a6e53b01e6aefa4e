"""The shutdown deadline and the batch tracker that detects when the agent has drained."""

from __future__ import annotations

import subprocess
import sys
import time

from worker.shutdown import EXIT_DEADLINE_PASSED, BatchTracker


def test_deadline_passed_exits_with_status():
    script = "import logging, time; logging.basicConfig(); from worker.shutdown import exit_after; exit_after(0.2); time.sleep(30)"

    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode == EXIT_DEADLINE_PASSED
    assert time.monotonic() - started < 20
    assert "not finished within 0.2 s (STREAMREC_SHUTDOWN_TIMEOUT_S)" in result.stderr


def test_tracker_idle_after_quiet_period():
    tracker = BatchTracker(quiet_s=0.2)
    tracker.started()
    time.sleep(0.3)
    assert not tracker.idle(), "a batch is still in flight"

    tracker.finished()
    assert not tracker.idle(), "the quiet period has not passed"
    time.sleep(0.3)
    assert tracker.idle()

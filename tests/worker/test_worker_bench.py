"""The benchmark CLI end to end in --quick mode, and the pieces it is built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from devkit.replay import event_message
from worker.bench import VARIANT_NAMES, paced_messages, ratios, repeated, synthetic_events, synthetic_item_ids
from worker.bench_apps import SCORE_LAST_STEP, Recomputer, RecurrentStep, decode_history, encode_history
from worker.metrics import WorkerMetrics
from worker.model import load_bundle
from worker.processor import DictStore, InputMessage

REPO_ROOT = Path(__file__).resolve().parents[2]
QUICK_EVENTS = 3_000  # worker.bench.QUICK_EVENTS, written out so that a change to it shows here
RATIO_KEYS = {"batched_over_passthrough", "coalesced_over_passthrough", "batched_over_batch1", "recompute_over_batched_compute"}
EVERY_EVENT_VARIANTS = ("passthrough", "batch1", "batched", "recompute")
# A quick run takes about 2 minutes: five workers share one group-join wait (about 30 s),
# then come five small backlogs and paced phases. The limit leaves room for a busy machine.
QUICK_RUN_TIMEOUT_S = 300


def input_messages(events: list[dict]) -> list[InputMessage]:
    messages = []
    for offset, event in enumerate(events):
        key, value = event_message(event)
        messages.append(InputMessage(key, value, "events", 0, offset, 1_700_000_000_000 + offset))
    return messages


def user_events(user_id: str, item_ids: list[str], first_id: int) -> list[dict]:
    return [
        {"event_id": f"e{first_id + index}", "user_id": user_id, "item_id": item, "event_type": "rating", "timestamp": 1_000 + index}
        for index, item in enumerate(item_ids)
    ]


def chained_top_k(model, item_ids: list[str], exclude_last: int) -> list[str]:
    """Apply a user's events one step at a time from a zero state and return the last step's top-K."""
    hidden, _ = model.initial_state()
    hidden = hidden[:, None, :]  # (layers, 1, hidden)
    indices = [model.item_index[item] for item in item_ids]
    exclude = np.array([indices[-exclude_last:]], dtype=np.int64)  # (1, n_exclude)
    event_type = np.array([model.event_type_index["rating"]], dtype=np.int64)
    for index in indices:
        output = model.step(np.array([index], dtype=np.int64), event_type, hidden, exclude)
        hidden = output.hidden
    return [model.item_ids[int(index)] for index in output.items[0]]


@pytest.fixture(scope="module")
def model(movielens_bundle):
    return load_bundle(movielens_bundle)


@pytest.mark.parametrize("scoring", ["every-step", SCORE_LAST_STEP])
def test_recompute_matches_chained_steps(model, scoring):
    # One batch in which the users' events interleave and their histories differ in length.
    alice = user_events("alice", ["1", "50", "100", "181"], first_id=0)
    bob = user_events("bob", ["7", "8"], first_id=100)
    events = [alice[0], bob[0], alice[1], alice[2], bob[1], alice[3]]
    recurrent_step = RecurrentStep(model, threads=1, optimization="all") if scoring == SCORE_LAST_STEP else None
    recomputer = Recomputer(model, history=3, metrics=WorkerMetrics(), max_event_bytes=65536, recurrent_step=recurrent_step)

    result = recomputer.process(input_messages(events), DictStore())

    assert len(result.recommendations) == len(events)
    bodies = [json.loads(output.value) for output in result.recommendations]
    last = {body["user_id"]: body for body in bodies}
    # With history=3, Alice's fourth event is recomputed over her last three events only.
    assert [item["item_id"] for item in last["alice"]["items"]] == chained_top_k(model, ["50", "100", "181"], exclude_last=3)
    assert [item["item_id"] for item in last["bob"]["items"]] == chained_top_k(model, ["7", "8"], exclude_last=3)
    assert {body["event_id"] for body in bodies} == {event["event_id"] for event in events}


def test_recompute_keeps_history_across_batches(model):
    store = DictStore()
    recomputer = Recomputer(model, history=3, metrics=WorkerMetrics(), max_event_bytes=65536)
    events = user_events("carol", ["3", "4", "5", "6"], first_id=0)

    recomputer.process(input_messages(events[:2]), store).write_states(store)
    result = recomputer.process(input_messages(events[2:]), store)
    result.write_states(store)

    items, _ = decode_history(store.values["carol"])
    assert items == [model.item_index[item] for item in ["4", "5", "6"]]
    top_k = [item["item_id"] for item in json.loads(result.recommendations[-1].value)["items"]]
    assert top_k == chained_top_k(model, ["4", "5", "6"], exclude_last=3)


def test_history_codec_round_trip():
    items, types = [5, 1_682, 0], [4, 0, 2]

    assert decode_history(encode_history(items, types)) == (items, types)
    assert decode_history(encode_history([], [])) == ([], [])


def test_history_codec_rejects_truncated_record():
    data = encode_history([1, 2, 3], [0, 0, 0])

    with pytest.raises(ValueError, match="expected 17"):
        decode_history(data[:-1])


def test_synthetic_stream_is_seeded_and_in_vocabulary():
    first = synthetic_events(2_000, users=500, items=300, seed=3)
    again = synthetic_events(2_000, users=500, items=300, seed=3)
    other = synthetic_events(2_000, users=500, items=300, seed=4)

    assert first == again
    assert first != other
    assert {event["item_id"] for event in first} <= set(synthetic_item_ids(300))
    timestamps = [event["timestamp"] for event in first]
    assert timestamps == sorted(timestamps)
    assert len({event["event_id"] for event in first}) == len(first)


def test_repeated_stream_gets_new_ids_and_later_times():
    events = user_events("dave", ["1", "2"], first_id=0)

    copies = repeated(events, 3)

    assert len(copies) == 6
    assert len({event["event_id"] for event in copies}) == 6
    assert [event["timestamp"] for event in copies] == sorted(event["timestamp"] for event in copies)


def test_paced_messages_continue_after_backlog():
    events = user_events("erin", ["1", "2"], first_id=0)
    backlog = repeated(events, 2)

    messages = paced_messages(events, 5, first_round=2)

    bodies = [json.loads(value) for _, value in messages]
    ids = [body["event_id"] for body in bodies]
    timestamps = [body["timestamp"] for body in bodies]
    assert len(set(ids)) == 5
    assert not set(ids) & {event["event_id"] for event in backlog}
    assert min(timestamps) > max(event["timestamp"] for event in backlog)
    assert timestamps == sorted(timestamps)


def test_ratios_of_missing_variant_are_none():
    results = {"batched": {"events_per_s": 100.0, "compute_us_per_event": 10.0}, "batch1": {"events_per_s": 40.0}}

    values = ratios(results)

    assert values["batched_over_batch1"] == pytest.approx(2.5)
    assert values["batched_over_passthrough"] is None
    assert values["recompute_over_batched_compute"] is None


@pytest.mark.e2e
def test_quick_benchmark_measures_every_variant(tmp_path, movielens_bundle):
    json_path = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "worker.bench", "--quick",
        "--json", str(json_path), "--bundle", str(movielens_bundle), "--work-dir", str(tmp_path / "work"),
    ]

    completed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=QUICK_RUN_TIMEOUT_S)

    assert completed.returncode == 0, f"exit code {completed.returncode}:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    assert "batched / passthrough" in completed.stdout
    document = json.loads(json_path.read_text())
    assert set(VARIANT_NAMES) | {"ratios"} <= set(document)
    assert RATIO_KEYS <= set(document["ratios"])
    for key in RATIO_KEYS:
        assert document["ratios"][key] > 0, key

    for name in VARIANT_NAMES:
        result = document[name]
        for key in ("events_per_s", "p50_ms", "p99_ms"):
            assert isinstance(result[key], float), f"{name}.{key} = {result[key]!r}"
        assert result["events"] == QUICK_EVENTS, name
        assert result["events_applied"] == QUICK_EVENTS, name
        assert result["complete"] is True, name
        assert result["peak_rss_mb"] > 0, name
        assert result["state_bytes_per_user"] > 0, name

    for name in EVERY_EVENT_VARIANTS:
        result = document[name]
        assert result["outputs"] == QUICK_EVENTS, name
        assert result["distinct_sources"] == QUICK_EVENTS, name
        assert result["paced_outputs"] == result["paced_events"], name
    coalesced = document["batched_coalesced"]
    assert 0 < coalesced["outputs"] < QUICK_EVENTS
    assert 0 < coalesced["paced_outputs"] <= coalesced["paced_events"]

    assert document["passthrough"]["compute_us_per_event"] == 0
    for name in ("batch1", "batched", "batched_coalesced", "recompute"):
        assert document[name]["compute_us_per_event"] > 0, name

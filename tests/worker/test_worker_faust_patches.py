"""The worker's corrections to faust-streaming: commits wait for the changelog, fetched records arrive in order, a repeated resume keeps queued events."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from faust.transport import consumer as faust_consumer
from faust.types import TP
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from worker import app as worker_app
from worker.config import Settings


@pytest.fixture
def commit_spy(monkeypatch, tmp_path):
    """Install the commit wrapper over a recording stand-in for faust's own commit; return (table, calls, commit, crashes)."""
    calls: list[dict] = []

    async def recorded_commit(self, offsets, start_new_transaction=True):
        calls.append(dict(offsets))
        return True

    monkeypatch.setattr(faust_consumer.Consumer, "_commit_offsets", recorded_commit)
    monkeypatch.setattr(faust_consumer.Consumer, "_streamrec_commits_after_changelog", False, raising=False)
    worker_app._commit_after_changelog()

    settings = Settings.from_env({"STREAMREC_STATE_DIR": str(tmp_path)})
    app = worker_app.build_faust_app(settings)  # installs the wrapper again: a no-op
    table = app.Table("states", partitions=1, **worker_app.RAW)
    crashes: list[BaseException] = []

    async def crash(exc):
        crashes.append(exc)

    consumer = SimpleNamespace(app=app, crash=crash, crashes=crashes)

    def commit(offsets):
        return faust_consumer.Consumer._commit_offsets(consumer, offsets)

    return table, calls, commit, crashes


def test_commit_waits_for_changelog(commit_spy):
    table, calls, commit, crashes = commit_spy

    async def scenario():
        record = asyncio.get_running_loop().create_future()
        table._unacknowledged.add(record)
        committing = asyncio.ensure_future(commit({"events-0": 42}))
        await asyncio.sleep(0.05)
        assert calls == [], "offsets were committed before the changelog record was acknowledged"
        record.set_result(None)
        assert await committing is True

    asyncio.run(scenario())
    assert calls == [{"events-0": 42}]
    assert crashes == []


def test_rejected_changelog_stops_without_commit(commit_spy, caplog):
    table, calls, commit, crashes = commit_spy

    async def scenario():
        record = asyncio.get_running_loop().create_future()
        record.set_exception(RuntimeError("broker refused the record"))
        table._unacknowledged.add(record)
        return await commit({"events-0": 42})

    assert asyncio.run(scenario()) is False
    assert calls == []
    assert [str(exc) for exc in crashes] == ["broker refused the record"]
    assert "were not delivered" in caplog.text
    assert "without committing offsets" in caplog.text


def test_repeated_resume_keeps_queue(monkeypatch):
    monkeypatch.setattr(FlowControlEvent, "resume", FlowControlEvent.resume)
    monkeypatch.setattr(FlowControlEvent, "_streamrec_keeps_queues", False, raising=False)
    worker_app._keep_queued_events_on_repeated_resume()

    async def scenario():
        flow = FlowControlEvent()
        queue = FlowControlQueue(flow_control=flow, clear_on_resume=True)
        flow.resume()  # a table recovery starts
        queue.put_nowait("event fetched while the consumer seeks")
        flow.resume()  # the recovery completes
        kept_after_repeat = queue.qsize()
        flow.suspend()  # a rebalance: the seek after it fetches the queued events again
        flow.resume()
        return kept_after_repeat, queue.qsize(), flow.is_active()

    kept_after_repeat, after_suspension, active = asyncio.run(scenario())

    assert kept_after_repeat == 1
    assert after_suspension == 0
    assert active


class _FakeConsumer:
    """The parts of a faust Consumer that the fetch wrapper reads, with preset records to fetch."""

    def __init__(self, records, committed_after_seek):
        self.records = records  # {tp: [offsets]} returned by the next fetch
        self.committed_after_seek = committed_after_seek
        self.app = SimpleNamespace(consumer_generation_id=1, topics=SimpleNamespace(acks_enabled_for=lambda topic: topic == "events"))
        self.flow_active = True
        self._committed_offset = {}
        self.seeks = []
        self.seek_started = asyncio.Event()
        self.seek_may_end = asyncio.Event()

    def assignment(self):
        return set(self.records)

    async def seek(self, tp, offset):
        self.seeks.append((tp, offset))

    async def earliest_offsets(self, *tps):
        return {tp: 0 for tp in tps}

    def _is_changelog_tp(self, tp):
        return tp.topic.endswith("-changelog")


@pytest.fixture
def fetch_wrapper(monkeypatch):
    """Install the fetch wrapper over stand-ins for faust's fetch, delivery and seek."""

    async def fake_fetch(self, timeout):
        return {tp: [SimpleNamespace(offset=offset) for offset in offsets] for tp, offsets in self.records.items()}, set(self.records)

    async def fake_deliver(self, timeout):
        records, _ = await faust_consumer.Consumer._wait_next_records(self, timeout)
        for tp, batch in records.items():
            for record in batch:
                yield tp, record

    async def fake_seek_to_committed(self):
        self.seek_started.set()
        await self.seek_may_end.wait()
        self._committed_offset.update(self.committed_after_seek)

    monkeypatch.setattr(faust_consumer.Consumer, "_wait_next_records", fake_fetch)
    monkeypatch.setattr(faust_consumer.Consumer, "getmany", fake_deliver)
    monkeypatch.setattr(faust_consumer.Consumer, "perform_seek", fake_seek_to_committed)
    monkeypatch.setattr(faust_consumer.Consumer, "_streamrec_in_order", False, raising=False)
    worker_app._deliver_fetched_records_in_order()


async def _delivered(consumer):
    return [(tp, message.offset) async for tp, message in faust_consumer.Consumer.getmany(consumer, 1.0)]


async def _fetch_during_seek(consumer):
    seeking = asyncio.ensure_future(faust_consumer.Consumer.perform_seek(consumer))
    await consumer.seek_started.wait()
    delivered = await _delivered(consumer)
    consumer.seek_may_end.set()
    await seeking
    return delivered


def test_records_fetched_during_seek_held_back(fetch_wrapper):
    events = TP("events", 0)
    consumer = _FakeConsumer({events: [10, 11, 12]}, {events: 4})

    delivered = asyncio.run(_fetch_during_seek(consumer))

    assert delivered == []
    assert consumer.seeks == [(events, 4)]


def test_uncommitted_partition_starts_at_earliest(fetch_wrapper):
    # The client's position of a partition kept through a rebalance is past records never processed.
    events, changelog = TP("events", 0), TP("app-state-changelog", 0)
    consumer = _FakeConsumer({events: [598, 599], changelog: [7]}, {})

    delivered = asyncio.run(_fetch_during_seek(consumer))

    # Changelog records go to the table as they come; the recovery places the changelog partitions itself.
    assert delivered == [(changelog, 7)]
    # Once for the missing commit, once for the held-back records.
    assert consumer.seeks == [(events, 0), (events, 0)]


def test_records_outside_seek_delivered_in_order(fetch_wrapper):
    first, second = TP("events", 0), TP("events", 1)
    consumer = _FakeConsumer({first: [10, 11, 12], second: [3]}, {})

    delivered = asyncio.run(_delivered(consumer))

    assert delivered == [(first, 10), (first, 11), (first, 12), (second, 3)]
    assert consumer.seeks == []

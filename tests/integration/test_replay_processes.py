"""A rebuild's lanes in separate processes (issue 12, item 4): equal to live, a lane
killed mid-rebuild fails it clearly and stops the others, and a run again resumes from
the marks exactly (and builds the indexes the first run had dropped)."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal

import psycopg
import pytest
from aiokafka import AIOKafkaProducer

from services.entitlements.bootstrap import READER_INDEXES, REPLAY_LANES, TABLES
from services.entitlements.projection import EntitlementsProjection
from shared import replay
from shared.config import Topics
from shared.errors import ConfigurationError
from shared.replay_lanes import PROCESSES_ENV, LaneFailed, default_processes
from tests.integration.test_entitlements_worker import (
    CATALOG,
    entitlements_worker,
    publish,
    stories,
    until_processed,
)
from tests.integration.test_replay_bulk import disputed_charges, indexes, live_db  # noqa: F401 - a fixture
from tests.support.slow_projection import slow

pytestmark = pytest.mark.integration


def bulk_spec(topic: str) -> replay.ProjectionSpec:
    """The entitlements projection as its bootstrap gives it to a rebuild (a make that pickles),
    with the reader indexes deferred."""
    return replay.ProjectionSpec(
        "entitlements", topic, TABLES, functools.partial(EntitlementsProjection, CATALOG, None),
        lanes=REPLAY_LANES, deferred_indexes=READER_INDEXES,  # deferred, to check a resume builds them
    )


def inbox_rows(database_url: str, schema: str) -> int:
    with psycopg.connect(database_url) as conn:
        query = psycopg.sql.SQL("SELECT count(*) FROM {} WHERE consumer = 'entitlements'").format(
            psycopg.sql.Identifier(schema, "processed_events"))
        return int(conn.execute(query).fetchone()[0])  # type: ignore[index]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_a_rebuild_in_lane_processes_equals_live_and_ends_with_every_live_index(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer  # noqa: F811
) -> None:
    events = stories(9) + disputed_charges(6)
    async with entitlements_worker(broker, topics.payment_events, live_db):
        await publish(producer, topics.payment_events, events)
        await until_processed(live_db, len(events))
    pids: list[int] = []
    figures = await replay.rebuild(
        live_db, broker, bulk_spec(topics.payment_events), "rebuild_procs", progress="never", processes=3,
        on_lane_processes=pids.extend,
    )
    assert figures["processes"] == 3 and figures["lanes"] == 3
    assert len(pids) == 3 and os.getpid() not in pids and all(gone(pid) for pid in pids)
    assert figures["offsets"] == len(events)
    assert replay.verify(live_db, bulk_spec(topics.payment_events), "rebuild_procs") == []
    assert indexes(live_db, "rebuild_procs") == indexes(live_db, "public")
    assert inbox_rows(live_db, "rebuild_procs") == len(events)


async def test_a_lane_process_killed_mid_rebuild_fails_it_naming_the_lane_and_a_run_again_resumes_exactly(
    broker: str, topics: Topics, live_db: str, producer: AIOKafkaProducer  # noqa: F811
) -> None:
    events = stories(12) + disputed_charges(6)
    async with entitlements_worker(broker, topics.payment_events, live_db):
        await publish(producer, topics.payment_events, events)
        await until_processed(live_db, len(events))
    spec = bulk_spec(topics.payment_events)
    # Batches of 4 events, each a quarter of a second: the lanes are still at work when one is killed.
    slowed = dataclasses.replace(spec, make=functools.partial(slow, spec.make, 0.25))
    pids: list[int] = []
    killed: list[int] = []

    def kill_the_second_lane_once_a_batch_is_in(applied: int) -> None:
        if applied > 0 and not killed:
            killed.append(pids[1])
            os.kill(pids[1], signal.SIGKILL)

    with pytest.raises(LaneFailed) as failure:
        await replay.rebuild(
            live_db, broker, slowed, "rebuild_killed", progress="never", processes=3, batch=4,
            on_lane_processes=pids.extend, on_progress=kill_the_second_lane_once_a_batch_is_in,
        )
    message = str(failure.value)
    assert f"lane process 1 (pid {pids[1]}, partitions [1])" in message and "killed by SIGKILL" in message
    assert "--resume" in message
    # The others were stopped, not left to finish: all three are gone, most of the events not applied.
    assert all(gone(pid) for pid in pids)
    left = inbox_rows(live_db, "rebuild_killed")
    assert 0 < left < len(events) // 2
    assert indexes(live_db, "rebuild_killed") != indexes(live_db, "public")  # the reader indexes wait for the load

    figures = await replay.rebuild(live_db, broker, spec, "rebuild_killed", progress="never", prepare=False, processes=3)
    assert figures["offsets"] == len(events) - left  # from the marks, not from the start
    assert replay.verify(live_db, spec, "rebuild_killed") == []
    assert inbox_rows(live_db, "rebuild_killed") == len(events)
    assert indexes(live_db, "rebuild_killed") == indexes(live_db, "public")


def test_the_number_of_lane_processes_comes_from_the_machine_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PROCESSES_ENV, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_processes(3) == 3  # one per lane: two would give one process two thirds of the work
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert default_processes(3) == 0
    monkeypatch.setenv(PROCESSES_ENV, "2")
    assert default_processes(3) == 2
    monkeypatch.setenv(PROCESSES_ENV, "many")
    with pytest.raises(ConfigurationError, match=PROCESSES_ENV):
        default_processes(3)


def test_a_rebuilds_batches_are_sized_so_its_lanes_locks_fill_at_most_half_the_servers_lock_table(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        per, connections, prepared = (int(conn.execute(f"SHOW {name}").fetchone()[0]) for name in (  # type: ignore[index]
            "max_locks_per_transaction", "max_connections", "max_prepared_transactions"))
    table = per * (connections + prepared)
    spec = dataclasses.replace(bulk_spec("payment-events"), locks_per_event=1.5)
    batch = replay.bulk_batch(database_url, spec, 3)
    assert 100 <= batch <= replay.BULK_BATCH
    assert batch == replay.BULK_BATCH or 3 * batch * 1.5 <= table * replay.LOCK_TABLE_SHARE < 3 * (batch + 1) * 1.5
    assert replay.bulk_batch(database_url, dataclasses.replace(spec, locks_per_event=0.0), 3) == replay.BULK_BATCH

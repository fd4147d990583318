"""A worker's per-partition gauges (lag, log mismatch) leave with the partition: after a
rebalance, only the partition's new owner reports it, so a stale value on the replica
that lost it cannot keep an alert firing (infra/prometheus/alerts.yaml)."""

from __future__ import annotations

from aiokafka import TopicPartition
from prometheus_client import REGISTRY

from shared.consumer import LogCheck, _SeekToDatabase
from shared.metrics import WORKER_LAG, WORKER_LOG_MISMATCH


def sample(metric: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(metric, {"consumer": "gauge-test", "topic": "t", "partition": str(partition)})


async def test_revoked_partitions_stop_reporting_lag_and_mismatch() -> None:
    for partition in (0, 1):
        WORKER_LAG.labels("gauge-test", "t", str(partition)).set(500)
        WORKER_LOG_MISMATCH.labels("gauge-test", "t", str(partition)).set(1)
    listener = _SeekToDatabase(None, None, "gauge-test", "t", "unused:9092", LogCheck("gauge-test"))  # type: ignore[arg-type]

    await listener.on_partitions_revoked([TopicPartition("t", 1), TopicPartition("t", 2)])

    assert (sample("paymentsvc_worker_lag_messages", 1), sample("paymentsvc_worker_log_mismatch", 1)) == (None, None)
    # The partition it keeps still reports.
    assert (sample("paymentsvc_worker_lag_messages", 0), sample("paymentsvc_worker_log_mismatch", 0)) == (500, 1)

"""The headers of our Kafka records, built the cheaper way (issue 13), are the bytes the
earlier code built: `ce_time` of whole milliseconds from the second's text, the constant
parts encoded once (the `reference_*` functions: the code as it was)."""

from __future__ import annotations

import random
import time
from datetime import datetime

import pytest

from shared import kafka
from shared.kafka import CE_SOURCES
from tests.unit.test_usage_event_bytes import reference_event_headers, reference_rfc3339

# ---------------------------------------------------------------- headers


def test_ce_time_of_whole_milliseconds_is_rfc3339_as_before() -> None:
    rng = random.Random(13)
    samples = [rng.randrange(1, 2**32 * 1000) for _ in range(20_000)]
    samples += [1, 999, 1000, 1001, 59_999, 86_400_000, 1_900_000_000_000, 1_900_000_000_700, 2**32 * 1000 - 1,
                2**32 * 1000, 2**32 * 1000 + 1, 253_402_214_400_123]
    for ms in samples:
        assert kafka.ce_time(ms / 1000) == reference_rfc3339(ms / 1000).encode(), ms
    for seconds in [1_900_000_000.1234, 1_900_000_000.0001, 1e-4, 0.5, -1.5, 1_900_000_000, 1]:
        assert kafka.ce_time(seconds) == reference_rfc3339(seconds).encode(), seconds
    now = kafka.ce_time(0.0).decode()
    assert abs(datetime.fromisoformat(now.replace("Z", "+00:00")).timestamp() - time.time()) < 5


@pytest.mark.parametrize("message", sorted(CE_SOURCES))
def test_event_headers_are_the_ones_built_before_for_every_message(message: str) -> None:
    for event_type, occurred_at in [("usage.recorded", 1_900_000_000.7), ("charge.succeeded", 1_900_000_000),
                                    ("t", 1_900_000_000.123456), ("x.y", 1_900_000_000.0)]:
        for trace_ in (None, [("traceparent", b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01")]):
            random.seed(7)
            built = kafka.event_headers("evt_1", event_type, message, occurred_at=occurred_at, trace=trace_)
            random.seed(7)
            expected = reference_event_headers("evt_1", event_type, message, occurred_at)
            if trace_ is not None:
                expected = [h for h in expected if h[0] != "traceparent"]
                expected[4:4] = trace_
            assert built == expected

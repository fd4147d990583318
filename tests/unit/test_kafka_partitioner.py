"""The producer's partitioner: aiokafka's default placement (murmur2, the Java client's),
with each key's hash remembered rather than recomputed in Python on every send."""

from __future__ import annotations

import secrets

import pytest
from aiokafka.partitioner import DefaultPartitioner

from shared import kafka
from shared.kafka import KeyHashPartitioner, make_producer


@pytest.mark.parametrize("partitions", [1, 3, 7, 12])
def test_every_key_lands_where_the_default_partitioner_puts_it(partitions: int) -> None:
    ours, default = KeyHashPartitioner(max_keys=50), DefaultPartitioner()
    all_partitions = list(range(partitions))
    keys = [secrets.token_hex(n).encode() for n in range(1, 40)] + [b"cus_Q2x7aZkLmN0pRsT", b"", b"fam1"]
    for key in keys * 3:  # the second and third rounds come from the remembered hashes
        assert ours(key, all_partitions, all_partitions) == default(key, all_partitions, all_partitions), key


def test_a_key_is_hashed_once_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    hashed: list[bytes] = []
    real = kafka.murmur2
    monkeypatch.setattr(kafka, "murmur2", lambda key: hashed.append(key) or real(key))
    ours = KeyHashPartitioner(max_keys=2)
    for key in (b"a", b"a", b"b", b"a", b"c", b"c"):
        ours(key, [0, 1, 2], [0, 1, 2])
    assert hashed == [b"a", b"b", b"c"]  # c filled the memory: forgotten, then remembered anew
    assert ours(b"a", [0, 1, 2], [0, 1, 2]) == DefaultPartitioner()(b"a", [0, 1, 2], [0, 1, 2])
    assert hashed[-1] == b"a"


def test_a_message_without_a_key_goes_to_an_available_partition() -> None:
    assert KeyHashPartitioner()(None, [0, 1, 2], [2]) == 2


async def test_the_producer_uses_it() -> None:
    producer = make_producer("127.0.0.1:1")
    assert isinstance(producer._partitioner, KeyHashPartitioner)

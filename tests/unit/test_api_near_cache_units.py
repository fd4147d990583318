"""The near cache's rules, with an injected clock: LRU bound, max age, invalidation
during a read, and bypass while the change feed is down or silent."""

from __future__ import annotations

from services.api_grpc.near_cache import NearCache, decode_keys

H1 = {"_watermark": {"created": 1, "event_id": "e1"}, "projects": {"allowed": True}}
H2 = {"_watermark": {"created": 2, "event_id": "e2"}, "projects": {"allowed": False}}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live(clock: Clock, **kwargs: float) -> NearCache:
    near = NearCache(clock=clock, **kwargs)  # type: ignore[arg-type]
    near.subscribed()
    return near


def fill(near: NearCache, key: str, value: dict[str, object] | None) -> None:
    token = near.begin([key])
    near.finish([key], token, [value])


def test_a_read_is_cached_and_served_until_max_age() -> None:
    clock = Clock()
    near = live(clock, max_age_s=1.0, liveness_s=10.0)
    assert near.get("k") is None
    fill(near, "k", H1)
    clock.now += 0.9
    assert near.get("k") == H1
    clock.now += 0.2
    assert near.get("k") is None  # older than max_age: read Redis again
    assert len(near) == 0


def test_absent_keys_and_failed_reads_are_not_cached() -> None:
    near = live(Clock())
    fill(near, "k", None)
    token = near.begin(["j"])
    near.finish(["j"], token, None)
    assert near.get("k") is None and near.get("j") is None
    assert near._reading == {} and near._invalidated == {}


def test_least_recently_used_entries_go_first() -> None:
    near = live(Clock(), max_entries=2)
    fill(near, "a", H1)
    fill(near, "b", H1)
    assert near.get("a") == H1  # a is now the most recent
    fill(near, "c", H1)
    assert near.get("b") is None
    assert near.get("a") == H1 and near.get("c") == H1
    assert len(near) == 2


def test_invalidation_evicts() -> None:
    near = live(Clock())
    fill(near, "a", H1)
    fill(near, "b", H1)
    near.invalidate(["a"])
    assert near.get("a") is None
    assert near.get("b") == H1


def test_a_read_overtaken_by_an_invalidation_is_not_cached() -> None:
    near = live(Clock())
    token = near.begin(["a", "b"])
    near.invalidate(["a"])  # the message arrives before the (possibly old) reply
    near.finish(["a", "b"], token, [H1, H1])
    assert near.get("a") is None
    assert near.get("b") == H1
    # A read that starts after the invalidation was processed sees the new hash: cached.
    fill(near, "a", H2)
    assert near.get("a") == H2
    assert near._reading == {} and near._invalidated == {}


def test_overlapping_reads_of_one_key() -> None:
    near = live(Clock())
    first = near.begin(["a"])
    near.invalidate(["a"])
    second = near.begin(["a"])
    near.finish(["a"], first, [H1])
    assert near.get("a") is None
    near.finish(["a"], second, [H2])
    assert near.get("a") == H2


def test_not_subscribed_bypasses() -> None:
    clock = Clock()
    near = NearCache(clock=clock)
    fill(near, "a", H1)
    assert not near.usable()
    assert near.get("a") is None and len(near) == 0


def test_losing_the_subscription_empties_and_bypasses_until_it_is_back() -> None:
    clock = Clock()
    near = live(clock)
    fill(near, "a", H1)
    token = near.begin(["b"])  # a read in flight across the outage
    near.unsubscribed()
    assert near.get("a") is None
    fill(near, "a", H1)
    assert near.get("a") is None  # nothing cached while down
    near.subscribed()
    near.finish(["b"], token, [H1])
    assert near.get("b") is None  # began before the subscription: may have missed a change
    fill(near, "a", H2)
    assert near.get("a") == H2


def test_a_silent_subscription_bypasses() -> None:
    clock = Clock()
    near = live(clock, max_age_s=5.0, liveness_s=1.0)
    fill(near, "a", H1)
    clock.now += 0.5
    near.heard()
    clock.now += 0.9
    assert near.get("a") == H1
    clock.now += 0.2  # 1.1 s since the last sign of life
    assert not near.usable()
    assert near.get("a") is None
    fill(near, "a", H1)
    assert near.get("a") is None
    near.heard()
    fill(near, "a", H2)
    assert near.get("a") == H2


def test_decode_keys() -> None:
    assert decode_keys(b"p:ent:user:u1\np:ent:family:f1") == ["p:ent:user:u1", "p:ent:family:f1"]
    assert decode_keys("") == []

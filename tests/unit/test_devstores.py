"""Which Postgres and Redis `paymentsvc dev` uses: the rule of paymentsvc/devstores.py.

The probes are injected (no server is reached): this tests the decision alone; the
e2e tier (tests/e2e/test_dev_embedded.py) runs the embedded servers for real.
"""

from __future__ import annotations

import pytest

from paymentsvc.devstores import choose_stores


def probe(answers: bool, seen: list[str]):  # type: ignore[no-untyped-def]
    def up(url: str) -> bool:
        seen.append(url)
        return answers

    return up


def test_unset_urls_with_the_default_servers_answering_use_the_machines() -> None:
    seen: list[str] = []
    choice = choose_stores({}, force=False, postgres_up=probe(True, seen), redis_up=probe(True, seen))
    assert (choice.embed_postgres, choice.embed_redis) == (False, False)
    assert seen == ["postgresql://postgres@127.0.0.1:5432/paymentsvc", "redis://127.0.0.1:6379/0"]


def test_unset_urls_with_nothing_answering_start_embedded_ones() -> None:
    choice = choose_stores({}, force=False, postgres_up=probe(False, []), redis_up=probe(False, []))
    assert (choice.embed_postgres, choice.embed_redis) == (True, True)
    assert "nothing answers" in choice.postgres_reason


@pytest.mark.parametrize("answers", [True, False])
def test_a_set_url_is_used_as_it_is_and_never_probed_here(answers: bool) -> None:
    seen: list[str] = []
    env = {"DATABASE_URL": "postgresql://app@db:5432/x", "REDIS_URL": "redis://cache:6379/0"}
    choice = choose_stores(env, force=False, postgres_up=probe(answers, seen), redis_up=probe(answers, seen))
    assert (choice.embed_postgres, choice.embed_redis) == (False, False)
    assert seen == []  # a set URL that does not answer is the usual error later, not a fallback


def test_embedded_forces_both_whatever_the_urls_say() -> None:
    seen: list[str] = []
    env = {"DATABASE_URL": "postgresql://app@db:5432/x"}
    choice = choose_stores(env, force=True, postgres_up=probe(True, seen), redis_up=probe(True, seen))
    assert (choice.embed_postgres, choice.embed_redis) == (True, True)
    assert choice.postgres_reason == "--embedded; DATABASE_URL ignored" and choice.redis_reason == "--embedded"
    assert seen == []


def test_each_store_is_decided_alone() -> None:
    choice = choose_stores({}, force=False, postgres_up=probe(True, []), redis_up=probe(False, []))
    assert (choice.embed_postgres, choice.embed_redis) == (False, True)

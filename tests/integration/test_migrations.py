"""Migrations: up from empty, down, up again, and the result is the declared schema."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from shared.migrate import MIGRATIONS_DIR, migrate_down, migrate_up
from tests.conftest import ADMIN_URL

pytestmark = pytest.mark.integration

FINGERPRINT_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, coalesce(column_default, '')
        FROM information_schema.columns
        WHERE table_schema = 'public' AND table_name NOT LIKE '%yoyo%'
        ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, pg_get_constraintdef(oid)
        FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text NOT LIKE '%yoyo%'
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexdef FROM pg_indexes
        WHERE schemaname = 'public' AND tablename NOT LIKE '%yoyo%'
        ORDER BY 1, 2""",
}


def fingerprint(url: str) -> dict[str, list[tuple]]:  # type: ignore[type-arg]
    with psycopg.connect(url) as conn:
        return {name: conn.execute(query).fetchall() for name, query in FINGERPRINT_QUERIES.items()}  # type: ignore[arg-type]


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"paymentsvc_mig_{secrets.token_hex(6)}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(ADMIN_URL, dbname=name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


empty_database_2 = empty_database


def test_every_migration_applies_rolls_back_and_applies_again_to_the_declared_schema(
    empty_database: str, empty_database_2: str
) -> None:
    count = len(list(MIGRATIONS_DIR.glob("[0-9]*.rollback.sql")))
    assert count >= 1

    assert migrate_up(empty_database, create_database=False) == count
    first = fingerprint(empty_database)
    assert migrate_down(empty_database) == count
    assert fingerprint(empty_database) == {name: [] for name in FINGERPRINT_QUERIES}, "down leaves nothing behind"
    assert migrate_up(empty_database, create_database=False) == count
    assert fingerprint(empty_database) == first

    with psycopg.connect(empty_database_2, autocommit=True) as conn:
        conn.execute((MIGRATIONS_DIR / "declared" / "schema.sql").read_text())  # type: ignore[arg-type]
    declared = fingerprint(empty_database_2)
    for part in FINGERPRINT_QUERIES:
        assert first[part] == declared[part], f"the migrated {part} differ from migrations/declared/schema.sql"


def test_applying_twice_does_nothing_the_second_time(empty_database: str) -> None:
    migrate_up(empty_database, create_database=False)
    assert migrate_up(empty_database, create_database=False) == 0


def test_the_schema_refuses_bad_states(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        bad_rows = [
            "INSERT INTO payments (payment_id, amount, currency, status, created_at, updated_at, last_event_id, last_event_created)"
            " VALUES ('pi_1', -5, 'usd', 'succeeded', now(), now(), 'evt', now())",
            "INSERT INTO payments (payment_id, amount, currency, status, created_at, updated_at, last_event_id, last_event_created)"
            " VALUES ('pi_2', 5, 'usd', 'exploded', now(), now(), 'evt', now())",
            "INSERT INTO payments (payment_id, amount, currency, status, amount_refunded, created_at, updated_at, last_event_id, last_event_created)"
            " VALUES ('pi_3', 5, 'usd', 'refunded', 6, now(), now(), 'evt', now())",
            "INSERT INTO plans (plan_id, name, tier) VALUES ('Not Valid', 'x', 0)",
        ]
        for statement in bad_rows:
            with pytest.raises(psycopg.errors.IntegrityError):
                conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("INSERT INTO processed_events VALUES ('c', 'evt_1', 't', 0, 0)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO processed_events VALUES ('c', 'evt_1', 't', 0, 1)")

"""apply_catalog against the real Postgres: idempotence, deletions, referenced plans."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import conninfo, sql

from shared.catalog import Catalog, CatalogError, apply_catalog, load_catalog
from shared.config import DEFAULT_CATALOG_PATH
from shared.migrate import migrate_up
from tests.conftest import ADMIN_URL

pytestmark = pytest.mark.integration

SERVER_URL = ADMIN_URL  # the session's server: the machine's or the embedded one
CATALOG_TABLES = ("plans", "pricing_zones", "plan_prices", "plan_features")


@pytest.fixture
def db_url() -> Iterator[str]:
    """A migrated throwaway database, dropped after the test."""
    name = f"catalog_{secrets.token_hex(6)}"
    with psycopg.connect(SERVER_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = conninfo.make_conninfo(SERVER_URL, dbname=name)
    try:
        migrate_up(url)
        yield url
    finally:
        with psycopg.connect(SERVER_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_url, autocommit=True) as connection:
        yield connection


def snapshot(conn: psycopg.Connection[Any]) -> dict[str, list[tuple[Any, ...]]]:
    return {
        table: conn.execute(
            sql.SQL("SELECT * FROM {} ORDER BY 1, 2").format(sql.Identifier(table))
        ).fetchall()
        for table in CATALOG_TABLES
    }


def edited_catalog(tmp_path: Path, edit: Any) -> Catalog:
    """The shipped catalog after `edit(data)`, written to a file and loaded from it."""
    data = yaml.safe_load(DEFAULT_CATALOG_PATH.read_text())
    edit(data)
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_catalog(path)


def test_loading_the_same_catalog_twice_changes_nothing(conn: psycopg.Connection[Any]) -> None:
    catalog = load_catalog(DEFAULT_CATALOG_PATH)
    first = apply_catalog(conn, catalog)
    rows = snapshot(conn)
    second = apply_catalog(conn, catalog)
    assert first == second == {"plans": 3, "features": 15, "prices": 6, "zones": 2}
    assert snapshot(conn) == rows  # updated_at included: an unchanged plan is not touched


def test_the_effective_policies_are_stored_with_each_plan(conn: psycopg.Connection[Any]) -> None:
    apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))
    policy, dunning = conn.execute(
        "SELECT access_policy, dunning_policy FROM plans WHERE plan_id = 'pro'"
    ).fetchone() or (None, None)
    assert policy["past_due"] == {"level": "full", "grace_days": 7, "then": "reduced"}
    assert policy["canceled"]["level"] == "blocked"
    assert dunning["retry_after_days"] == [1, 3, 5, 7]
    assert conn.execute("SELECT plan_id FROM plans WHERE is_default").fetchall() == [("free",)]


def test_removing_a_feature_from_the_file_deletes_it_on_reload(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))
    catalog = edited_catalog(tmp_path, lambda d: d["plans"]["pro"]["features"].pop("ai_credits"))
    counts = apply_catalog(conn, catalog)
    assert counts["features"] == 14
    codes = conn.execute(
        "SELECT feature_code FROM plan_features WHERE plan_id = 'pro' ORDER BY 1"
    ).fetchall()
    assert ("ai_credits",) not in codes
    assert ("ai_credits",) in conn.execute(
        "SELECT feature_code FROM plan_features WHERE plan_id = 'basic'"
    ).fetchall()


def test_removing_a_price_and_an_unreferenced_plan_deletes_them(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))

    def edit(data: dict[str, Any]) -> None:
        del data["plans"]["pro"]
        del data["plans"]["basic"]["prices"]["price_basic_monthly_eur"]

    apply_catalog(conn, edited_catalog(tmp_path, edit))
    assert conn.execute("SELECT plan_id FROM plans ORDER BY 1").fetchall() == [
        ("basic",),
        ("free",),
    ]
    prices = conn.execute("SELECT price_id FROM plan_prices ORDER BY 1").fetchall()
    assert prices == [("price_basic_monthly",), ("price_basic_yearly",)]
    # No price is in the eu zone any more, and the file still lists it: it stays.
    assert conn.execute("SELECT count(*) FROM pricing_zones").fetchone() == (2,)


def test_a_plan_a_subscription_references_cannot_be_removed(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))
    now = datetime.now(UTC)
    conn.execute(
        """
        INSERT INTO subscriptions (subscription_id, customer_id, plan_id, price_id, status,
                                   created_at, updated_at, last_event_id, last_event_created)
        VALUES ('sub_1', 'cus_1', 'basic', 'price_basic_monthly', 'active', %s, %s, 'evt_1', %s)
        """,
        (now, now, now),
    )
    before = snapshot(conn)

    def edit(data: dict[str, Any]) -> None:
        del data["plans"]["basic"]
        data["plans"]["pro"]["features"].pop("seats")  # a change that must be rolled back

    with pytest.raises(CatalogError, match=r"plans\.basic: removed from the catalog") as info:
        apply_catalog(conn, edited_catalog(tmp_path, edit))
    assert "1 subscription(s)" in str(info.value)
    assert snapshot(conn) == before


def test_the_default_can_move_to_another_plan(
    conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    apply_catalog(conn, load_catalog(DEFAULT_CATALOG_PATH))

    def edit(data: dict[str, Any]) -> None:
        data["plans"]["free"]["default"] = False
        data["plans"]["starter"] = {"name": "Starter", "tier": 0, "default": True}

    apply_catalog(conn, edited_catalog(tmp_path, edit))
    assert conn.execute("SELECT plan_id FROM plans WHERE is_default").fetchall() == [("starter",)]

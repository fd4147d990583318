"""How to send a batch of rows to Postgres: the three shapes the entitlements worker could use.

Upserts `--rows` rows of a subscriptions-like table (19 columns, its primary key and
two indexes) in one transaction, `--repeats` times per shape, all shapes on one
connection in one run, and prints the wall time and the client CPU per batch and the
ratios to `executemany` (the baseline: what the worker did before issue 12):

* executemany: one statement per row, all in one pipeline;
* unnest: one statement, one text-format array per column;
* json: one statement, the rows as one JSON array of objects (orjson) read by
  `json_populate_recordset(NULL::table, ...)` (what services/entitlements does).

It checks that every shape leaves the same rows. The table is a temporary one, gone
when the run ends. Needs the machine's Postgres (BENCH_ADMIN_DATABASE_URL).

    .venv/bin/python bench/write_shapes.py [--rows 500] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Json

ADMIN_URL = os.environ.get("BENCH_ADMIN_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

TEXT = ["subscription_id", "customer_id", "user_id", "family_id", "plan_id", "price_id", "status"]
TIMES = ["current_period_start", "current_period_end", "cancel_at", "canceled_at", "trial_end"]
MORE_TEXT = ["access_level"]
MORE_TIMES = ["status_since", "created_at", "updated_at"]
COLUMNS = [*TEXT, *TIMES, "cancel_at_period_end", *MORE_TEXT, *MORE_TIMES, "last_event_id", "last_event_created"]
TYPES = {c: "timestamptz" for c in [*TIMES, *MORE_TIMES, "last_event_created"]} | {"cancel_at_period_end": "boolean"}

TABLE = f"""
CREATE TEMP TABLE bench_rows ({", ".join(f"{c} {TYPES.get(c, 'text')}" for c in COLUMNS)},
                              PRIMARY KEY (subscription_id));
CREATE INDEX ON bench_rows (customer_id);
CREATE INDEX ON bench_rows (user_id, subscription_id);
"""
INSERT = f"INSERT INTO bench_rows ({', '.join(COLUMNS)}) "
UPDATE = " ON CONFLICT (subscription_id) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:])
SHAPES: dict[str, str] = {
    "executemany": INSERT + "VALUES (" + ", ".join(f"%({c})s" for c in COLUMNS) + ")" + UPDATE,
    "unnest": INSERT + "SELECT * FROM unnest(" + ", ".join(f"%({c})s::{TYPES.get(c, 'text')}[]" for c in COLUMNS) + ")" + UPDATE,
    "json": INSERT + f"SELECT {', '.join(COLUMNS)} FROM json_populate_recordset(NULL::bench_rows, %(rows)s)" + UPDATE,
}


def make_rows(n: int, round_: int) -> list[dict[str, Any]]:
    """n rows; each round updates the same keys with new values (an upsert, as the worker's)."""
    base = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=round_)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {c: f"{c}_{i}_{round_}" for c in [*TEXT, *MORE_TEXT, "last_event_id"]}
        row["subscription_id"] = f"sub_{i:08d}"
        row.update({c: base + timedelta(days=i % 30) for c in [*TIMES, *MORE_TIMES, "last_event_created"]})
        row["canceled_at"] = None
        row["cancel_at_period_end"] = i % 2 == 0
        rows.append(row)
    return rows


def params_of(shape: str) -> Callable[[list[dict[str, Any]]], Any]:
    if shape == "unnest":
        return lambda rows: {c: [r[c] for r in rows] for c in COLUMNS}
    if shape == "json":
        return lambda rows: {"rows": Json(rows, dumps=orjson.dumps)}
    return lambda rows: rows


async def measure(conn: psycopg.AsyncConnection[Any], shape: str, rows_n: int, repeats: int) -> tuple[float, float, list[Any]]:
    """(wall s, client CPU s) per batch, and the rows the shape left."""
    await conn.execute("TRUNCATE bench_rows")
    await conn.commit()
    to_params = params_of(shape)
    wall = cpu = 0.0
    for round_ in range(repeats):
        rows = make_rows(rows_n, round_)
        started, cpu_started = time.perf_counter(), time.process_time()
        async with conn.transaction(), conn.pipeline(), conn.cursor() as cursor:
            if shape == "executemany":
                await cursor.executemany(SHAPES[shape], to_params(rows))
            else:
                await cursor.execute(SHAPES[shape], to_params(rows), prepare=True)
        wall += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
    cursor = await conn.execute(f"SELECT {', '.join(COLUMNS)} FROM bench_rows ORDER BY subscription_id")
    return wall / repeats, cpu / repeats, await cursor.fetchall()


async def main(args: argparse.Namespace) -> None:
    async with await psycopg.AsyncConnection.connect(ADMIN_URL) as conn:
        await conn.execute(TABLE)
        await conn.commit()
        figures = {shape: await measure(conn, shape, args.rows, args.repeats) for shape in SHAPES}
    base_wall, base_cpu, base_rows = figures["executemany"]
    print(f"{args.rows} rows of 19 columns per batch, {args.repeats} batches per shape")
    print(f"{'shape':<12} | {'wall/batch':>10} | {'client CPU':>10} | wall ratio | CPU ratio")
    for shape, (wall, cpu, _) in figures.items():
        print(f"{shape:<12} | {wall * 1e3:>7.1f} ms | {cpu * 1e3:>7.1f} ms | {wall / base_wall:>10.2f} | {cpu / base_cpu:>9.2f}")
    for shape, (_, _, rows) in figures.items():
        same = rows == base_rows and len(rows) == args.rows
        print(f"  {'ok  ' if same else 'FAIL'} {shape} leaves the same {len(rows)} rows as executemany")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=20)
    asyncio.run(main(parser.parse_args()))

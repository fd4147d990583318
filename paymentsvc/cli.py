"""`paymentsvc`: the one command line of the project.

Errors that an operator can act on (a dependency down, a bad setting, a bad
catalog) are printed as one line and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from shared.config import SERVICE_NAMES, Settings
from shared.errors import ConfigurationError, DependencyUnavailable

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
catalog_app = typer.Typer(no_args_is_help=True, help="The plan catalog.")
topics_app = typer.Typer(no_args_is_help=True, help="Kafka topics.")
app.add_typer(catalog_app, name="catalog")
app.add_typer(topics_app, name="topics")
usage_app = typer.Typer(no_args_is_help=True, help="Usage counters and quotas.")
app.add_typer(usage_app, name="usage")
entitlements_app = typer.Typer(no_args_is_help=True, help="The entitlements projection's Redis answers.")
app.add_typer(entitlements_app, name="entitlements")


@app.callback()
def _options(
    config: Annotated[
        Path | None,
        typer.Option("--config", help="A config.yaml in the Go service's shape (sets CONFIG_FILE; variables win over it)."),
    ] = None,
) -> None:
    if config is not None:
        # Through the environment, so that the services `dev` starts read it too.
        os.environ["CONFIG_FILE"] = str(config)


def _settings(report: bool = True) -> Settings:
    """The settings; with `report`, the notes on the Go service's names and file are
    logged (once per process; `serve` reports after its logging is configured)."""
    settings = Settings()
    if report:
        _report_config_notes(settings)
    return settings


def _report_config_notes(settings: Settings) -> None:
    from shared import go_compat

    go_compat.report_notes(os.environ, settings.config_file)


@app.command()
def migrate(
    down: Annotated[bool, typer.Option(help="Roll back instead of applying.")] = False,
    steps: Annotated[int | None, typer.Option(help="With --down: how many (default all).")] = None,
    database_url: Annotated[str | None, typer.Option(help="Default: DATABASE_URL.")] = None,
) -> None:
    """Apply pending migrations (creating the database if needed), or roll back."""
    from shared import migrate as migrations

    url = database_url or _settings().database_url.get_secret_value()
    if down:
        count = migrations.migrate_down(url, steps=steps)
        typer.echo(f"rolled back {count} migration(s)")
    else:
        count = migrations.migrate_up(url)
        typer.echo(f"applied {count} migration(s)")


@app.command("migration-create")
def migration_create(name: str) -> None:
    """Write the next numbered migration and its rollback file."""
    from shared import migrate as migrations

    up, down = migrations.create_migration(name)
    typer.echo(f"created {os.path.relpath(up.resolve())} and {os.path.relpath(down.resolve())}")


@catalog_app.command("load")
def catalog_load(
    path: Annotated[Path | None, typer.Argument(help="Default: CATALOG_PATH or catalog/plans.yaml.")] = None,
) -> None:
    """Validate the catalog file and load it into plans, prices and features."""
    from shared import db
    from shared.catalog import apply_catalog, load_catalog

    settings = _settings()
    catalog = load_catalog(path or settings.catalog_path)
    with db.connect(settings.database_url.get_secret_value()) as conn:
        counts = apply_catalog(conn, catalog)
    typer.echo("loaded " + ", ".join(f"{n} {what}" for what, n in counts.items()))


@topics_app.command("create")
def topics_create() -> None:
    """Create the service topics on KAFKA_BOOTSTRAP_SERVERS (those missing)."""
    from shared.devbroker import ensure_topics

    settings = _settings()
    bootstrap = _require_bootstrap(settings)
    created = asyncio.run(ensure_topics(bootstrap, settings.topics.all(), settings.kafka_partitions))
    typer.echo(f"created {len(created)} topic(s): {', '.join(created) or '-'}")


def _require_bootstrap(settings: Settings) -> str:
    if not settings.kafka_bootstrap_servers:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS is not set; `paymentsvc dev` runs an embedded broker"
        )
    return settings.kafka_bootstrap_servers


@usage_app.command("rebuild-cache")
def usage_rebuild_cache(
    settle: Annotated[float | None, typer.Option(help="Seconds to let publishes in flight finish; default publish timeout + 2.")] = None,
) -> None:
    """Rebuild the Redis usage counters from Postgres (after Redis was emptied or restarted)."""
    from redis.asyncio import Redis

    from services.usage.bootstrap import rebuild_cache
    from services.usage.rebuild import LeaseLost, RebuildRunning
    from shared.progress import phase_spinner

    settings = _settings()
    _require_bootstrap(settings)

    async def run() -> None:
        redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=10)
        try:
            with phase_spinner(settings.progress_output) as bar:
                task = bar.add_task("usage rebuild-cache", total=None)
                figures = await rebuild_cache(
                    settings, redis, settle_s=settle, on_phase=lambda text: bar.update(task, description=text)
                )
        finally:
            await redis.aclose()
        typer.echo(
            f"rebuilt {figures.counters} counter(s), {figures.members} member counter(s), "
            f"{figures.idempotency_records} idempotency record(s)"
        )

    try:
        asyncio.run(run())
    except (RebuildRunning, LeaseLost) as exc:  # another rebuild runs, or took over this one
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


@entitlements_app.command("rebuild-cache")
def entitlements_rebuild_cache(
    subject: Annotated[str | None, typer.Option(help="Only this subject, as TYPE:ID (e.g. user:u_123).")] = None,
) -> None:
    """Rewrite the Redis entitlement answers from Postgres (all subjects, or one); safe while the worker runs."""
    import psycopg
    from redis.asyncio import Redis
    from redis.exceptions import RedisError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from services.entitlements.bootstrap import rebuild_cache

    settings = _settings()
    key: tuple[str, str] | None = None
    if subject is not None:
        subject_type, _, subject_id = subject.partition(":")
        if not subject_type or not subject_id:
            raise ConfigurationError(f"--subject must be TYPE:ID, e.g. user:u_123; got {subject!r}")
        key = (subject_type, subject_id)

    async def run() -> int:
        redis = Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=10, socket_connect_timeout=5)
        columns = (TextColumn("rebuild entitlements cache"), BarColumn(), MofNCompleteColumn(), TextColumn("subjects"))
        try:
            with Progress(*columns, console=_progress_console()) as bar:
                task = bar.add_task("", total=None)
                return await rebuild_cache(
                    settings, redis, key, progress=lambda done, total: bar.update(task, completed=done, total=total)
                )
        except (OSError, RedisError, psycopg.OperationalError) as exc:
            raise DependencyUnavailable("entitlements cache", "postgres/redis", str(exc).splitlines()[0]) from exc
        finally:
            await redis.aclose()

    done = asyncio.run(run())
    typer.echo(f"rewrote the Redis answers of {done} subject(s) from Postgres")


def _progress_console() -> Any:
    """Progress on stderr, so the last line of stdout is the result; PROGRESS_OUTPUT decides when."""
    from shared.progress import console

    return console(_settings().progress_output)


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICE_NAMES)}")],
    processes: Annotated[int, typer.Option(
        min=1, help="api_grpc and ingest_webhooks: this many processes sharing the ports (SO_REUSEPORT), one per core.",
    )] = 1,
) -> None:
    """Run one service, as production would, until SIGTERM or Ctrl-C."""
    from paymentsvc import runner
    from shared import logs

    settings = _settings(report=False)
    _require_bootstrap(settings)
    logs.configure(settings.log_level, settings.log_format, service)
    if processes > 1:
        # The children report the configuration notes; the parent only supervises.
        raise typer.Exit(runner.supervise(service, settings, processes))
    _report_config_notes(settings)
    runner.run(service, settings)


@app.command()
def dev(
    embedded: Annotated[
        bool,
        typer.Option(
            "--embedded",
            help="Start our own Postgres (cluster kept in LOG_DIR/postgres) and Redis, whatever "
            "DATABASE_URL and REDIS_URL say. Without it, they start only when unset and nothing answers.",
        ),
    ] = False,
    log_dir: Annotated[Path, typer.Option(help="Where the children write their logs.")] = Path(".dev"),
    with_prometheus: Annotated[bool, typer.Option(help="Also run Prometheus (Debian's package) scraping every service, with the alert rules.")] = False,
) -> None:
    """Run the whole stack on embedded defaults (see README), until Ctrl-C."""
    from paymentsvc.devstack import run_dev
    from shared import logs

    logs.configure("INFO", "console", "dev")
    # The broker's first probes are refused while Tansu starts; that is expected.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    asyncio.run(run_dev(log_dir, with_prometheus, embedded=embedded))


@app.command()
def replay(
    projection: Annotated[str, typer.Argument(help="The projection to rebuild, e.g. entitlements.")],
    into: Annotated[str, typer.Option(help="A new schema to rebuild into (or, with --verify, one rebuilt before).")],
    swap: Annotated[bool, typer.Option(help="After the rebuild, switch it in while the live worker runs.")] = False,
    verify: Annotated[bool, typer.Option(help="Only compare INTO with the live tables.")] = False,
    resume: Annotated[bool, typer.Option(help="Carry on an interrupted rebuild of INTO from its marks.")] = False,
    processes: Annotated[
        int | None,
        typer.Option(help="Lane processes (0: every lane in this one). Default: one per lane on 2 cores or more "
                     "($PAYMENTSVC_REPLAY_PROCESSES), none for a small topic."),
    ] = None,
) -> None:
    """Rebuild a projection from its topic into a fresh schema, verify it, optionally swap it in."""
    from paymentsvc.runner import load
    from shared import replay as replays
    from shared.replay_lanes import LaneFailed

    settings = _settings()
    module = load(projection)
    if not hasattr(module, "replay_spec"):
        raise ConfigurationError(f"{projection} has no replayable projection")
    spec = module.replay_spec(settings)
    database_url = settings.database_url.get_secret_value()
    if not verify:
        bootstrap = _require_bootstrap(settings)
        try:
            figures = asyncio.run(replays.rebuild(
                database_url, bootstrap, spec, into, progress=settings.progress_output, prepare=not resume,
                processes=processes,
            ))
        except LaneFailed as exc:
            typer.echo(str(exc).replace("...", f"{projection} --into {into}"), err=True)
            raise typer.Exit(1) from None
        typer.echo(
            f"rebuilt {projection} into {into}: {figures['offsets']:.0f} events in {figures['seconds']:.1f} s "
            f"({figures['events_per_s']:.0f} events/s, {figures['lanes']:.0f} lanes in "
            f"{figures['processes'] or 'this'} process{'es' if figures['processes'] else ''}, "
            f"{figures['poison']:.0f} poison skipped)"
        )
    differences = replays.verify(database_url, spec, into)
    for line in differences:
        typer.echo(f"differs: {line}")
    if not differences:
        typer.echo(f"{into} equals the live {projection} projection ({len(spec.tables)} tables)")
    if swap:
        copied = asyncio.run(replays.swap(database_url, _require_bootstrap(settings), spec, into, progress=settings.progress_output))
        typer.echo("swapped in: " + ", ".join(f"{t} {n}" for t, n in copied.items()))
    elif verify and differences:
        raise typer.Exit(1)


@app.command()
def renormalize(
    event_id: Annotated[list[str] | None, typer.Option("--event-id", help="A Stripe event id to re-normalize (repeatable).")] = None,
    since: Annotated[str | None, typer.Option(help="Archived at or after this ISO-8601 time (UTC unless given).")] = None,
    until: Annotated[str | None, typer.Option(help="Archived before this ISO-8601 time.")] = None,
    from_dlq: Annotated[bool, typer.Option("--from-dlq", help="Everything the ingester dead-lettered to payment-events.dlq.")] = False,
    apply: Annotated[bool, typer.Option("--apply", help="Publish; without it, only report what would be published.")] = False,
) -> None:
    """Normalize archived Stripe events again (after a parser fix) and publish them with their own event ids."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from services.ingest_webhooks.renormalize import Selection, parse_time
    from services.ingest_webhooks.renormalize import renormalize as run

    selection = Selection(
        event_ids=frozenset(event_id or ()),
        since=parse_time(since, "--since") if since else None,
        until=parse_time(until, "--until") if until else None,
        from_dlq=from_dlq,
    )
    settings = _settings()
    bootstrap = _require_bootstrap(settings)
    # The bar goes to stderr, so stdout is the report; its total is known before it starts.
    with Progress(
        TextColumn("reading the archive"), BarColumn(), MofNCompleteColumn(),
        console=_progress_console(), transient=True,
    ) as bar:
        task = bar.add_task("read", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        found = asyncio.run(run(bootstrap, settings.topics, selection, apply=apply, progress=progress))
    for line in found.lines(apply, settings.topics.payment_events):
        typer.echo(line)


@app.command()
def backfill(
    apply: Annotated[bool, typer.Option("--apply", help="Publish; without it, only read Stripe and report the counts.")] = False,
    customer: Annotated[str | None, typer.Option(help="Only this Stripe customer (cus_...).")] = None,
    recent_days: Annotated[int, typer.Option(help="Invoices and charges created in the last N days.")] = 90,
    checkpoint: Annotated[Path, typer.Option(help="Where an --apply run keeps the last customer done, to resume.")] = Path(
        "backfill.checkpoint"
    ),
    page_size: Annotated[int, typer.Option(help="Objects per Stripe list request (1..100).")] = 100,
    concurrency: Annotated[int, typer.Option(help="Customers read at once (1..32).")] = 8,
) -> None:
    """Publish the current state of Stripe (subscriptions, recent invoices and charges) as snapshot events."""
    import time

    from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn

    from services.ingest_webhooks.backfill import (
        Checkpoint,
        KafkaSink,
        Options,
        Report,
        StripeReader,
    )
    from services.ingest_webhooks.backfill import backfill as run

    options = Options(
        apply=apply, customer_id=customer, recent_days=recent_days, page_size=page_size, concurrency=concurrency
    )
    settings = _settings()
    if settings.stripe_secret_key is None:
        raise ConfigurationError("STRIPE_SECRET_KEY is not set: the backfill reads from Stripe")
    bootstrap = _require_bootstrap(settings) if apply else ""

    async def main(bar: Progress, task: Any) -> Report:
        assert settings.stripe_secret_key is not None
        reader = StripeReader.connect(settings.stripe_secret_key.get_secret_value(), settings.stripe_api_base)
        sink = KafkaSink(bootstrap) if apply else None
        try:
            if sink is not None:
                await sink.start()
            return await run(
                reader, sink, settings.topics, options, checkpoint=Checkpoint(checkpoint), now=int(time.time()),
                progress=lambda r: bar.update(task, completed=r.customers, events=r.events),
            )
        finally:
            if sink is not None:
                await sink.stop()
            await reader.close()

    # The bar goes to stderr, so stdout is the report; Stripe gives no customer count up front.
    with Progress(
        SpinnerColumn(), TextColumn("backfill: customers"), MofNCompleteColumn(), TextColumn("{task.fields[events]} snapshots"),
        console=_progress_console(), transient=True,
    ) as bar:
        found = asyncio.run(main(bar, bar.add_task("backfill", total=None, events=0)))
    for line in found.lines(apply, settings.topics.payment_events):
        typer.echo(line)


@app.command("send-webhook")
def send_webhook(
    event_type: Annotated[str, typer.Argument(help="A Stripe event type, e.g. invoice.paid")],
    to: Annotated[str | None, typer.Option(help="Default: the local ingester.")] = None,
    api_version: Annotated[str | None, typer.Option(help="Stripe API version of the payload shape.")] = None,
    customer: Annotated[str | None, typer.Option(help="Stripe customer id.")] = None,
    user: Annotated[str | None, typer.Option(help="metadata.user_id")] = None,
    secret: Annotated[str | None, typer.Option(help="Signing secret; default the first of STRIPE_WEBHOOK_SECRETS, or the dev secret.")] = None,
) -> None:
    """Sign a realistic Stripe event and POST it to the ingester, like `stripe trigger`."""
    from paymentsvc.dev.webhooks import post_sample_event

    settings = _settings()
    status, body = post_sample_event(
        settings, event_type, to=to, api_version=api_version, customer_id=customer, user_id=user, secret=secret
    )
    typer.echo(f"{status} {body}")
    if status >= 300:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point: operator errors become one line and exit status 2."""
    from shared.catalog import CatalogError

    # One-shot commands report failures themselves; client libraries' own
    # connection warnings would only repeat them as noise.
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        # Without standalone mode, click returns an Exit's code instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except (DependencyUnavailable, ConfigurationError, CatalogError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: invalid configuration: {problems}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        # Usage errors (unknown command, missing argument) of typer's bundled click.
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise


if __name__ == "__main__":
    main()

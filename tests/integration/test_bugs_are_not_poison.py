"""Only an event invalid by the contract is poison; a bug in a handler stops the line (issue 11, item 3).

Each projection's `apply` runs in a real Postgres transaction. The bug is injected by
replacing the pure handler function (there is no peer to fake here: the point is what
the projection does with an exception that is not `InvalidEvent`).
"""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from services.dunning import handlers as dunning_handlers
from services.dunning.projection import DunningProjection
from services.entitlements import handlers as entitlements_handlers
from services.entitlements.projection import EntitlementsProjection
from shared.catalog import Catalog
from shared.projection import ApplyContext, PoisonEvent
from tests.integration.test_entitlements_projection import T0, Ids, envelopes, event, sub_event

pytestmark = pytest.mark.integration


def projections(catalog: Catalog) -> list[tuple[Any, Any]]:
    return [(EntitlementsProjection(catalog, None), entitlements_handlers),
            (DunningProjection(catalog, None), dunning_handlers)]


async def apply(url: str, projection: Any, events: list[Any]) -> None:
    ctx = ApplyContext(consumer=projection.name, replay=False, now=time.time())
    async with await psycopg.AsyncConnection.connect(url) as conn:
        async with conn.transaction():
            await projection.apply(conn, envelopes(events), ctx)


@pytest.mark.parametrize("which", [0, 1], ids=["entitlements", "dunning"])
async def test_a_handler_bug_propagates_as_itself_never_as_poison(
    db: str, catalog: Catalog, monkeypatch: pytest.MonkeyPatch, which: int
) -> None:
    projection, handlers = projections(catalog)[which]

    def buggy(*args: object, **kwargs: object) -> object:
        return {}["a key we forgot"]

    monkeypatch.setattr(handlers, "apply", buggy)
    with pytest.raises(KeyError):
        await apply(db, projection, [event(Ids(), "invoice.payment_failed", T0)])


@pytest.mark.parametrize("which", [0, 1], ids=["entitlements", "dunning"])
async def test_an_event_invalid_by_the_contract_is_poison(
    db: str, catalog: Catalog, monkeypatch: pytest.MonkeyPatch, which: int
) -> None:
    projection, handlers = projections(catalog)[which]

    def rejecting(*args: object, **kwargs: object) -> object:
        raise handlers.InvalidEvent("a negative amount")

    monkeypatch.setattr(handlers, "apply", rejecting)
    bad = event(Ids(), "invoice.payment_failed", T0)
    with pytest.raises(PoisonEvent) as raised:
        await apply(db, projection, [bad])
    assert raised.value.event_id == bad.event_id and "a negative amount" in raised.value.reason


async def test_a_real_invalid_event_is_still_poison_without_any_patch(db: str, catalog: Catalog) -> None:
    ids = Ids()
    bad = sub_event(ids, "created", T0, period_start=T0, period_end=T0 - 1)
    with pytest.raises(PoisonEvent, match="period ends before it starts"):
        await apply(db, EntitlementsProjection(catalog, None), [bad])

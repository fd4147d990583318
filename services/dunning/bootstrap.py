"""Composition root of the dunning service. Not built yet (issue 7).

`paymentsvc serve dunning` fails with a clear error instead of pretending to run,
and `paymentsvc dev` skips it.
"""

from __future__ import annotations

import asyncio

from shared.config import Settings
from shared.runner import ServiceNotBuilt

BUILT = False


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    raise ServiceNotBuilt("dunning", issue=7)

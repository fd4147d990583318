"""Composition root of the usage service. Not built yet (issue 6).

`paymentsvc serve usage` fails with a clear error instead of pretending to run,
and `paymentsvc dev` skips it.
"""

from __future__ import annotations

import asyncio

from shared.config import Settings
from shared.runner import ServiceNotBuilt

BUILT = False


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    raise ServiceNotBuilt("usage", issue=6)

"""Composition root of the entitlements service. Not built yet (issue 4).

`paymentsvc serve entitlements` fails with a clear error instead of pretending to run,
and `paymentsvc dev` skips it.
"""

from __future__ import annotations

import asyncio

from shared.config import Settings
from shared.runner import ServiceNotBuilt

BUILT = False


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    raise ServiceNotBuilt("entitlements", issue=4)

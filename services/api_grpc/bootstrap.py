"""Composition root of the api_grpc service. Not built yet (issue 5).

`paymentsvc serve api_grpc` fails with a clear error instead of pretending to run,
and `paymentsvc dev` skips it.
"""

from __future__ import annotations

import asyncio

from shared.config import Settings
from shared.runner import ServiceNotBuilt

BUILT = False


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    raise ServiceNotBuilt("api_grpc", issue=5)

"""Per-call values that interceptors share with each other and with the servicer.

gRPC aio runs each call in its own task, so a ContextVar set by one interceptor is seen
by the layers inside it and, after they return, by the layers outside.
"""

from __future__ import annotations

from contextvars import ContextVar

# The name (never the secret) of the API key that made the call; "" before auth.
CALLER: ContextVar[str] = ContextVar("api_caller", default="")

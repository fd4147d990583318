"""Domain errors of the API. Servicers and use cases raise these; one interceptor
(interceptors.CallInterceptor) turns them into gRPC status codes.

Nothing here imports grpc except the code each error maps to, so the use cases stay
free of transport details.
"""

from __future__ import annotations

import grpc


class ApiError(Exception):
    """An error the client may see, with its message. Subclasses set `code`."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ApiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ApiError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(ApiError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ApiError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ApiError):
    """A dependency (Postgres, Redis, Stripe, the broker) cannot answer now; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(ApiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceeded(ApiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ApiError):
    code = grpc.StatusCode.UNIMPLEMENTED


class RateLimited(ApiError):
    """The caller's token bucket is empty; `retry_after_s` goes to the trailers."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

"""Domain errors of the service. They carry no HTTP knowledge: `app.py` maps them to statuses."""

from __future__ import annotations


class ServiceError(Exception):
    """Base of the errors a client or operator can act on; `code` names it in JSON responses."""

    code = "service_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class UnknownMarketError(ServiceError):
    code = "unknown_market"

    def __init__(self, market: str, known: list[str]) -> None:
        super().__init__(
            f"unknown market {market!r}; known markets: {', '.join(known) or 'none'}",
            market=market, known_markets=known,
        )


class InvalidRequestError(ServiceError):
    """A well-formed body whose values break a configured limit (k, number of items)."""

    code = "invalid_request"


class SessionNotFoundError(ServiceError):
    code = "session_not_found"


class SessionStoreUnavailableError(ServiceError):
    """The session store (Redis) cannot be reached; stateless requests keep working."""

    code = "session_store_unavailable"


class IndexLoadError(ServiceError):
    """An index that is missing, corrupt or inconsistent with its checkpoint's market."""

    code = "index_error"


class IndexMismatchError(IndexLoadError):
    """An index built from other weights than the checkpoint being served."""

    code = "index_mismatch"


class IndexBuildError(ServiceError):
    """An index that cannot be built as asked for this market; nothing is written, and the
    market's current index keeps serving."""

    code = "index_build"


class IndexRecallError(IndexBuildError):
    """An approximate index whose recall@10 against exact search is below the floor at build
    time; it is not written, and the market's current index keeps serving."""

    code = "index_recall"


class ArtifactsError(ServiceError):
    """Artifacts that cannot be served (no markets, unreadable checkpoint or index)."""

    code = "artifacts_error"


class ReloadError(ServiceError):
    """A reload that failed; the previous models and indexes keep serving."""

    code = "reload_failed"


class NotReadyError(ServiceError):
    code = "not_ready"


class AdminDisabledError(ServiceError):
    """The admin endpoints are off because no admin token is configured."""

    code = "not_found"


class ForbiddenError(ServiceError):
    code = "forbidden"

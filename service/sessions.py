"""Session state: a capped list of item ids per market and session, with a TTL. Redis when a URL
is configured (one atomic script call per request), in-process otherwise. The only module that
knows the Redis key format.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.errors import SessionNotFoundError, SessionStoreUnavailableError

logger = logging.getLogger(__name__)
T = TypeVar("T")


# Append, cap, refresh the TTL and read back, atomically in one round trip (a Lua script runs
# alone on the server, like MULTI/EXEC). One command and one reply instead of MULTI, four
# commands and EXEC: about a third of the client-side work, which runs on the event loop.
# KEYS[1] the session; ARGV = max_items, ttl_s, items... (pushed in slices: Lua's unpack() has
# a stack limit near 8000 values).
APPEND_SCRIPT = """
for i = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[1]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return redis.call('LRANGE', KEYS[1], 0, -1)
"""


def session_key(market: str, session_id: str) -> str:
    """Market codes hold no ':' (the API validates them), so keys never collide."""
    return f"xmr:session:{market}:{session_id}"


class SessionStore(Protocol):
    kind: str

    async def append(self, market: str, session_id: str, items: list[str]) -> list[str]:
        """Append items (oldest first), trim to the cap, refresh the TTL; the whole session."""
        ...

    async def get(self, market: str, session_id: str) -> list[str]: ...

    async def delete(self, market: str, session_id: str) -> bool: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _not_found(market: str, session_id: str) -> SessionNotFoundError:
    return SessionNotFoundError(f"no session {session_id!r} in market {market!r} (or it expired)",
                                market=market, session_id=session_id)


class MemorySessionStore:
    """In-process sessions for one process (the embedded default and the demo)."""

    kind = "memory"

    def __init__(self, ttl_s: int, max_items: int, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._clock = clock
        self._sessions: dict[str, tuple[float, list[str]]] = {}  # key -> (expires_at, items)
        self._ops = 0

    def _live(self, key: str) -> list[str] | None:
        entry = self._sessions.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._sessions[key]
            return None
        return entry[1]

    def _sweep(self) -> None:
        now = self._clock()
        for key in [k for k, (expires, _) in self._sessions.items() if expires <= now]:
            del self._sessions[key]

    async def append(self, market: str, session_id: str, items: list[str]) -> list[str]:
        self._ops += 1
        if self._ops % 1024 == 0:
            self._sweep()
        key = session_key(market, session_id)
        session = ((self._live(key) or []) + list(items))[-self.max_items :]
        if session:  # like Redis: an empty list is no session
            self._sessions[key] = (self._clock() + self.ttl_s, session)
        return list(session)

    async def get(self, market: str, session_id: str) -> list[str]:
        session = self._live(session_key(market, session_id))
        if not session:
            raise _not_found(market, session_id)
        return list(session)

    async def delete(self, market: str, session_id: str) -> bool:
        return self._sessions.pop(session_key(market, session_id), None) is not None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._sessions.clear()


class RedisSessionStore:
    """Sessions as Redis lists; every failure to reach Redis is a SessionStoreUnavailableError."""

    kind = "redis"

    def __init__(self, client: Redis, ttl_s: int, max_items: int) -> None:
        self.client = client
        self.ttl_s = ttl_s
        self.max_items = max_items
        self._append = client.register_script(APPEND_SCRIPT)  # EVALSHA, loaded on NOSCRIPT

    @classmethod
    def from_url(
        cls, url: str, pool_size: int, timeout_s: float, ttl_s: int, max_items: int
    ) -> RedisSessionStore:
        pool = BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=timeout_s, decode_responses=True,
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
            # One quick retry lets a connection left stale by a Redis restart reconnect.
            retry=Retry(NoBackoff(), 1),
        )
        return cls(Redis.from_pool(pool), ttl_s, max_items)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        try:
            return await call()
        except (TimeoutError, RedisError, OSError) as e:
            logger.warning("session store error op=%s error=%r", what, e)
            raise SessionStoreUnavailableError(f"session store unavailable ({what}): {e}") from e

    async def append(self, market: str, session_id: str, items: list[str]) -> list[str]:
        key = session_key(market, session_id)

        async def run() -> list[Any]:
            return await self._append(  # type: ignore[no-any-return]
                keys=[key], args=[self.max_items, self.ttl_s, *items]
            )

        return [str(item) for item in await self._call("append", run)]

    async def get(self, market: str, session_id: str) -> list[str]:
        key = session_key(market, session_id)

        async def run() -> list[str]:
            items = await self.client.lrange(key, 0, -1)  # type: ignore[misc]
            return [str(item) for item in items]

        session = await self._call("get", run)
        if not session:
            raise _not_found(market, session_id)
        return list(session)

    async def delete(self, market: str, session_id: str) -> bool:
        key = session_key(market, session_id)

        async def run() -> int:
            return int(await self.client.delete(key))

        return bool(await self._call("delete", run))

    async def ping(self) -> None:
        async def run() -> object:
            return await self.client.ping()  # type: ignore[misc]

        await self._call("ping", run)

    async def close(self) -> None:
        await self.client.aclose()


def create_session_store(
    redis_url: str | None, pool_size: int, timeout_s: float, ttl_s: int, max_items: int
) -> SessionStore:
    if redis_url is None:
        return MemorySessionStore(ttl_s, max_items)
    return RedisSessionStore.from_url(redis_url, pool_size, timeout_s, ttl_s, max_items)

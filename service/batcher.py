"""Micro-batching: concurrent recommend requests of one market merged into one encoder call.

With `max_size` 1 every request runs alone in a worker thread. Otherwise one consumer task
takes a request, gathers what else is queued (up to `max_size`, waiting at most `wait_s`),
and runs each market's group in one thread call. Requests queue up while a batch runs, so
batches grow with load even when `wait_s` is 0. Groups are keyed by the MarketModel object, so
a batch never mixes the versions of a reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import anyio.to_thread

from service.bundle import MarketModel
from service.recommender import Query, Recommendation, recommend_many

logger = logging.getLogger(__name__)

Pending = tuple[MarketModel, Query, "asyncio.Future[Recommendation]"]


class Batcher:
    def __init__(
        self, max_size: int = 1, wait_s: float = 0.0, on_batch: Callable[[int], None] | None = None
    ) -> None:
        self.max_size = max_size
        self.wait_s = wait_s
        self._on_batch = on_batch or (lambda size: None)
        self._queue: asyncio.Queue[Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, model: MarketModel, query: Query) -> Recommendation:
        if self.max_size == 1:
            self._on_batch(1)
            results = await anyio.to_thread.run_sync(recommend_many, model, [query])
            return results[0]
        if self._queue is None or self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._consume(self._queue))
        future: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((model, query, future))
        return await future

    async def _gather(self, queue: asyncio.Queue[Pending]) -> list[Pending]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run_group(self, model: MarketModel, group: list[Pending]) -> None:
        self._on_batch(len(group))
        try:
            results = await anyio.to_thread.run_sync(
                recommend_many, model, [query for _, query, _ in group]
            )
        except Exception as e:  # every waiting request gets the failure, none hangs
            for _, _, future in group:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, _, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _consume(self, queue: asyncio.Queue[Pending]) -> None:
        while True:
            batch = await self._gather(queue)
            groups: dict[int, list[Pending]] = {}
            for pending in batch:
                groups.setdefault(id(pending[0]), []).append(pending)
            await asyncio.gather(*(self._run_group(g[0][0], g) for g in groups.values()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                _, _, future = self._queue.get_nowait()
                if not future.done():
                    future.cancel()
            self._queue = None

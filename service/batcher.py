"""Micro-batching: concurrent recommend requests merged into one encoder call per market.

One consumer task takes a request, gathers what else is queued (up to `max_size`, waiting at
most `wait_s`), and answers each market's group of the batch with one encoder call and one
index search. Requests queue up while a batch runs, so batches grow with load even when
`wait_s` is 0; with `max_size` 1 every request is a batch of its own. Groups are keyed by the
MarketModel object, so a batch never mixes the versions of a reload.

A request that reads its session from the store first (`pending`) is expected: while one is
between its store call and its submission, a batch waits up to `join_s` for it. Otherwise it
would miss the batch that the requests parsed with it make, and wait for the next one too
(measured at concurrency 8 before this: session requests p50 21-22 ms against 12 ms for the
others).

Where a batch runs (`in_thread`):
- on the event loop (the CPU default): the encoder's Python work holds the GIL either way, and
  handing each batch to a thread and back cost more than the overlap won (measured, 2 cores,
  concurrency 8: 1,297 against 1,133 requests/s; p50 5.3 against 6.9 ms);
- in one dedicated thread (the GPU default), where the device works while the loop serves.
  One thread, not a pool: parallel encoder calls fight over the GIL and the cores (measured:
  6 pool threads each running a group served fewer requests/s than one running them in turn).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from service.bundle import MarketModel
from service.recommender import Query, Recommendation, recommend_many

logger = logging.getLogger(__name__)

Pending = tuple[MarketModel, Query, "asyncio.Future[Recommendation]"]
# How long a batch waits at most for requests still reading their session from the store: about
# a Redis round trip under load, far less than the batch cycle such a request would otherwise
# wait for.
JOIN_S = 0.002
Outcome = list[Recommendation] | BaseException  # one market group's answers, or its failure


def answer(groups: list[tuple[MarketModel, list[Query]]]) -> list[Outcome]:
    """Each market group in turn (on the loop or in the encoder thread); a failing group fails
    alone."""
    outcomes: list[Outcome] = []
    for model, queries in groups:
        try:
            outcomes.append(recommend_many(model, queries))
        except Exception as e:  # noqa: BLE001 - handed to that group's waiters
            outcomes.append(e)
    return outcomes


class Batcher:
    def __init__(
        self, max_size: int = 1, wait_s: float = 0.0, on_batch: Callable[[int], None] | None = None,
        thread_init: Callable[[], None] | None = None, in_thread: bool = True,
        join_s: float = JOIN_S,
    ) -> None:
        """`thread_init` runs first in the encoder thread: OpenMP thread counts are per thread,
        so a count set on the event loop's thread does not reach FAISS calls made there."""
        self.max_size = max_size
        self.in_thread = in_thread
        self._thread_init = thread_init
        self.wait_s = wait_s
        self._on_batch = on_batch or (lambda size: None)
        self._queue: asyncio.Queue[Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None
        self.join_s = join_s
        self._pending = 0  # requests between their store call and `submit`

    @contextlib.contextmanager
    def pending(self) -> Iterator[None]:
        """Around a request's store call that precedes its `submit` (with no await between
        the two): batches formed meanwhile wait up to `join_s` for it."""
        self._pending += 1
        try:
            yield
        finally:
            self._pending -= 1

    async def submit(self, model: MarketModel, query: Query) -> Recommendation:
        if self._queue is None or self._task is None:
            self._queue = asyncio.Queue()
            if self.in_thread:
                self._thread = ThreadPoolExecutor(1, thread_name_prefix="xmr-encoder",
                                                  initializer=self._thread_init)
            self._task = asyncio.create_task(self._consume(self._queue, self._thread))
        future: asyncio.Future[Recommendation] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((model, query, future))
        return await future

    async def _gather(self, queue: asyncio.Queue[Pending]) -> list[Pending]:
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        started = loop.time()
        while len(batch) < self.max_size:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            # pending requests may extend the wait to `join_s`, never shorten it
            left = started + max(self.wait_s, self.join_s if self._pending else 0.0) - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _run(self, batch: list[Pending], thread: ThreadPoolExecutor | None) -> None:
        groups: dict[int, list[Pending]] = {}
        for pending in batch:
            groups.setdefault(id(pending[0]), []).append(pending)
        for group in groups.values():
            self._on_batch(len(group))
        work = [(g[0][0], [query for _, query, _ in g]) for g in groups.values()]
        try:
            if thread is not None:
                outcomes = await asyncio.get_running_loop().run_in_executor(thread, answer, work)
            else:
                outcomes = answer(work)
        except Exception as e:  # every waiting request gets the failure, none hangs
            outcomes = [e] * len(work)
        for group, outcome in zip(groups.values(), outcomes, strict=True):
            for i, (_, _, future) in enumerate(group):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome[i])

    async def _consume(self, queue: asyncio.Queue[Pending],
                       thread: ThreadPoolExecutor | None) -> None:
        while True:
            await self._run(await self._gather(queue), thread)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        if self._queue is not None:
            while not self._queue.empty():
                _, _, future = self._queue.get_nowait()
                if not future.done():
                    future.cancel()
            self._queue = None

"""Dynamic batching for the server: coalesce concurrent requests into engine batches, fan results out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from esm2cli.errors import OverloadedError, TooLargeError
from esm2cli.runtime.batching import pack_batches

log = logging.getLogger(__name__)

SubmitFn = Callable[[list[str]], Future]  # Engine.submit: blocks while every replica's queue is full


Row = dict[Any, Any]  # {layer: pooled vector}, and "tokens": {layer: per-residue vectors} for windows
TakeFn = Callable[[int, Row], Row]  # (the sequence's place in its request, its row) -> what the request keeps


@dataclass
class _Request:
    """One request's sequences and the future its handler awaits."""

    seqs: list[str]
    future: asyncio.Future
    take: TakeFn
    rows: list[Row | None] = field(default_factory=list)
    missing: int = 0


class Slot:
    """One engine batch's place among those in flight: given back exactly once, however its holder ends.

    ``async with slot:`` gives it back when the block ends (an answer, an error, a cancellation);
    ``pass_on()`` hands it to another holder (the task that fans a batch's results out), after which
    this one gives back nothing.
    """

    def __init__(self, give_back: Callable[[], None]):
        self._give_back: Callable[[], None] | None = give_back

    def release(self) -> None:
        give_back, self._give_back = self._give_back, None
        if give_back is not None:
            give_back()

    def pass_on(self) -> Slot:
        """A new holder of this place; this one no longer holds it."""
        give_back, self._give_back = self._give_back, None
        if give_back is None:
            raise RuntimeError("this slot was given back already; this is a bug")
        return Slot(give_back)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class Slots:
    """At most ``size`` engine batches in flight: ``await take()`` waits for a free place."""

    def __init__(self, size: int):
        self.size = size
        self.held = 0
        self._free = asyncio.Semaphore(size)

    async def take(self) -> Slot:
        await self._free.acquire()
        self.held += 1
        return Slot(self._give_back)

    async def wait_free(self) -> None:
        """Returns once a place is free, without taking it (for a caller that is the only taker)."""
        async with await self.take():
            pass

    def _give_back(self) -> None:
        self.held -= 1
        self._free.release()


@dataclass(frozen=True, kw_only=True)
class BatcherStats:
    """Hooks for metrics: called with each engine batch's size."""

    on_batch: Callable[[int], None] = lambda size: None


class DynamicBatcher:
    """Collects requests for up to ``max_wait_s`` or ``max_batch`` sequences, then submits them together.

    With ``coalesce=False`` each request is submitted on its own (dynamic batching off). At most
    ``max_queue`` sequences may be accepted and unanswered; past that, embed() raises
    OverloadedError at once instead of growing memory.

    A request whose caller gives up (its embed() is cancelled: the client left) frees its place in
    the queue at once; its sequences are dropped from batches not yet submitted, and an engine batch
    that only it needed is cancelled before a replica takes it.
    """

    def __init__(
        self,
        submit: SubmitFn,
        *,
        max_batch: int,
        max_wait_s: float,
        max_tokens: int,
        max_queue: int,
        max_in_flight: int,
        coalesce: bool = True,
        stats: BatcherStats | None = None,
    ):
        self._submit = submit
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_tokens = max_tokens
        self.max_queue = max_queue
        self.coalesce = coalesce
        self._stats = stats or BatcherStats()
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._in_flight: set[asyncio.Task] = set()
        # Requests wait here, not in the engine's queues, while every replica is busy: the next
        # batch then takes everything that arrived meanwhile instead of being cut early.
        self.slots = Slots(max_in_flight)
        self._dispatcher: asyncio.Task | None = None
        self._waiting: set[int] = set()  # ids of the requests not yet taken into a batch
        self.pending = 0  # sequences accepted and not yet answered

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet taken into a batch (those whose caller left are not counted)."""
        return len(self._waiting)

    def start(self) -> None:
        """Starts the dispatcher task on the running event loop."""
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def stop(self) -> None:
        """Answers everything already accepted, then stops the dispatcher."""
        while not self._queue.empty() or self._in_flight:
            await asyncio.sleep(0.01)
        if self._dispatcher:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)

    async def embed(self, seqs: Sequence[str], take: TakeFn | None = None) -> list[Row]:
        """Embeds one request's validated sequences; returns one {layer: vector} per sequence, in order.

        Args:
            seqs: The sequences (each a batch item: a window of a long protein is one).
            take: Called with each sequence's place and row as its batch comes back; the request keeps what it
                returns (the server sums windows' per-residue vectors at once, and keeps none of them).

        Raises:
            TooLargeError: The request alone holds more than max_queue sequences: no retry can help.
            OverloadedError: The queue is full.
            EngineError: The engine failed on one of the batches.
        """
        if len(seqs) > self.max_queue:
            raise TooLargeError(f"the request holds {len(seqs)} sequences, more than the server queues at once "
                                f"({self.max_queue}, --max-queue); send fewer")  # fmt: skip
        if self.pending + len(seqs) > self.max_queue:
            raise OverloadedError(f"the server queue is full ({self.pending} sequences waiting); retry later")
        request = _Request(list(seqs), asyncio.get_running_loop().create_future(), take or (lambda _, row: row))
        request.rows, request.missing = [None] * len(seqs), len(seqs)
        self.pending += len(seqs)
        self._waiting.add(id(request))
        self._queue.put_nowait(request)
        try:
            return await request.future  # cancelling this task cancels request.future too
        finally:
            self.pending -= len(seqs)
            self._waiting.discard(id(request))

    async def _next_group(self) -> list[_Request]:
        """Takes the next request, then (coalescing) more until max_batch sequences or max_wait_s."""
        group = [await self._queue.get()]
        if not self.coalesce:
            return group
        size = len(group[0].seqs)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while size < self.max_batch:
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                request = (
                    self._queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self._queue.get(), timeout)
                )
            except (asyncio.QueueEmpty, TimeoutError):
                break
            group.append(request)
            size += len(request.seqs)
        return group

    async def _dispatch_forever(self) -> None:
        while True:
            await self.slots.wait_free()  # for a free replica slot before forming the next group
            group = [r for r in await self._next_group() if not r.future.done()]  # skip requests that gave up
            for request in group:
                self._waiting.discard(id(request))
            slots = [(request, i) for request in group for i in range(len(request.seqs))]
            for rows in pack_batches([len(request.seqs[i]) for request, i in slots], self.max_tokens, self.max_batch):
                # At once for the first batch: this loop is the only taker, and a place was free.
                slot = await self.slots.take()
                # A request may have given up while the previous batches waited for a slot.
                await self._submit_batch(slot, [slots[k] for k in rows if not slots[k][0].future.done()])

    async def _submit_batch(self, slot: Slot, members: list[tuple[_Request, int]]) -> None:
        """Submits one engine batch; its slot goes to the task that fans its results out (or back, at once)."""
        async with slot:
            if not members:
                return
            seqs = [request.seqs[i] for request, i in members]
            try:
                future = await asyncio.to_thread(self._submit, seqs)
            except Exception as exc:
                self._fail(members, exc)
                return
            self._stats.on_batch(len(seqs))
            unwatch = self._cancel_when_abandoned(members, future)
            task = asyncio.get_running_loop().create_task(
                self._fan_out(slot.pass_on(), members, asyncio.wrap_future(future), unwatch)
            )
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    @staticmethod
    def _cancel_when_abandoned(members: list[tuple[_Request, int]], future: Future) -> Callable[[], None]:
        """Cancels an engine batch once every request in it has given up (a replica then skips it); returns what
        stops watching, for once the batch is back: the callback holds the batch's future, and so its results,
        for as long as a request of many batches waits."""
        requests = list({id(request): request for request, _ in members}.values())

        def check(_) -> None:
            if all(request.future.done() for request in requests):
                future.cancel()  # no effect once a replica has started it

        def unwatch() -> None:
            for request in requests:
                request.future.remove_done_callback(check)

        for request in requests:
            request.future.add_done_callback(check)
        return unwatch

    async def _fan_out(
        self, slot: Slot, members: list[tuple[_Request, int]], result: asyncio.Future, unwatch: Callable[[], None]
    ) -> None:
        async with slot:  # given back once the batch is answered, failed or cancelled
            try:
                embeddings = await result
            except asyncio.CancelledError:
                return  # the batch was cancelled before it ran: nobody waits for it
            except Exception as exc:
                self._fail(members, exc)
                return
            finally:
                unwatch()
        try:
            for k, (request, i) in enumerate(members):
                row: Row = {layer: matrix[k] for layer, matrix in embeddings.pooled.items()}
                if embeddings.per_token:  # windows of a long protein, to be stitched by the server
                    row["tokens"] = {layer: arrays[k] for layer, arrays in embeddings.per_token.items()}
                request.rows[i] = request.take(i, row)
                request.missing -= 1
                if request.missing == 0 and not request.future.done():
                    request.future.set_result(request.rows)
        except Exception as exc:  # a result of the wrong shape: fail the waiters rather than leave them hanging
            log.error("cannot fan out a batch's results; this is a bug: %r", exc)
            self._fail(members, exc)

    @staticmethod
    def _fail(members: list[tuple[_Request, int]], exc: Exception) -> None:
        for request, _ in members:
            if not request.future.done():
                request.future.set_exception(exc)

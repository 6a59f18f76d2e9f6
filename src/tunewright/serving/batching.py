"""Dynamic batching: one worker thread does all model work, grouping requests that can share a batch.

Every piece of work goes through one queue and one thread. That thread takes the oldest waiting
item, then gathers others with the same `batch_key` (same model, same adapter, compatible
generation settings) for at most `wait_s`, up to `max_batch_size`, and runs them together.
Items with another key wait, in order, for a later batch. Because only this thread touches the
models, switching a shared model's adapter between batches can never leak into another request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Work(Protocol):
    """What the batcher needs from an item of work."""

    @property
    def batch_key(self) -> Hashable | None:
        """Items with equal keys may run in one batch; None runs alone."""
        ...

    @property
    def cancelled(self) -> bool:
        """The requester has gone (disconnect, timeout): skip the item."""
        ...

    def fail(self, error: BaseException) -> None:
        """Tell the requester the item could not be run."""
        ...

    def run_batch(self, batch: list[Any]) -> None:
        """Run `batch` (this item and others with its key); report results to each item."""
        ...


W = TypeVar("W", bound=Work)


class ShuttingDown(Exception):
    """The server stopped before this work could run."""


class DynamicBatcher(Generic[W]):
    """A worker thread that runs groups of compatible work items (`first.run_batch(batch)`).

    Args:
        max_batch_size: most items per batch; 1 turns batching off.
        wait_s: how long the first item of a batch waits for company.
    """

    def __init__(self, max_batch_size: int, wait_s: float) -> None:
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[W | None] = queue.Queue()
        self._backlog: deque[W] = deque()  # taken from the queue but left for a later batch
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.batches_run = 0
        self.largest_batch = 0

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="tunewright-batcher", daemon=True)
                self._thread.start()

    @property
    def pending(self) -> int:
        """Items waiting for the worker (not counting the batch it is running)."""
        return self._queue.qsize() + len(self._backlog)

    def submit(self, work: W) -> None:
        if self._stopping:
            work.fail(ShuttingDown("the server is shutting down"))
            return
        self.start()
        self._queue.put(work)

    def stop(self, timeout_s: float | None = None) -> None:
        """Finish the batch in progress, fail whatever is still waiting, and end the thread.

        The thread always ends before this returns: after `timeout_s` it logs a warning and keeps waiting.
        """
        with self._lock:
            self._stopping = True
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout_s)
            if thread.is_alive():
                # Exiting while the worker is inside a torch call aborts the process ("terminate called
                # without an active exception"); the batch in progress is one model step or chunk at most.
                log.warning("waiting for the batch in progress to end before stopping")
                thread.join()
        self._fail_waiting()

    def _fail_waiting(self) -> None:
        waiting = list(self._backlog)
        self._backlog.clear()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                waiting.append(item)
        for item in waiting:
            item.fail(ShuttingDown("the server is shutting down"))

    def _loop(self) -> None:
        while True:
            first = self._backlog.popleft() if self._backlog else self._queue.get()
            if first is None:
                return
            if first.cancelled:
                continue
            batch = self._gather(first)
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                first.run_batch(batch)
            except Exception as error:  # a fault in one batch must not kill the worker
                log.exception("a batch of %d failed", len(batch))
                for item in batch:
                    item.fail(error)
            if self._stopping:  # stop() fails whatever is still waiting
                return

    def _gather(self, first: W) -> list[W]:
        key = first.batch_key
        batch = [first]
        if key is None or self.max_batch_size == 1:
            return batch
        # Compatible items already set aside go first, keeping the others in arrival order.
        kept: deque[W] = deque()
        while self._backlog:
            item = self._backlog.popleft()
            if item.cancelled:
                continue
            if item.batch_key == key and len(batch) < self.max_batch_size:
                batch.append(item)
            else:
                kept.append(item)
        self._backlog = kept
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            # Take whatever is already queued at once; wait only while the window is open.
            remaining = deadline - time.monotonic()
            try:
                arrived = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if arrived is None:  # stop: run this batch, then end
                self._stopping = True
                break
            if arrived.cancelled:
                continue
            if arrived.batch_key == key:
                batch.append(arrived)
            else:
                self._backlog.append(arrived)
        return batch

"""A single background thread that runs write work in submission order.

The forward pass submits "store this batch" and "commit this shard" and moves straight on to the next
batch; the bounded queue (default 2 items) caps memory at a couple of batches of hidden states and makes
the forward pass wait only when writing falls behind. Errors surface on the next submit or on drain().
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class BackgroundWriter:
    def __init__(self, max_pending: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="probecache-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a failure, drop remaining work: nothing half-done commits
                    fn, args = item
                    fn(*args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the submitting thread
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, fn: Callable, *args) -> None:
        self._raise_if_failed()
        self._queue.put((fn, args))

    def drain(self) -> None:
        """Block until everything submitted so far is done; re-raise a failure."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

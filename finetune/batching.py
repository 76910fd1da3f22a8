"""Dynamic batching for ``finetune serve``: concurrent requests' images, one model call.

One thread owns the model. A request hands it its images' input views and waits on a
future; the thread takes the first waiting request, then keeps taking requests for up to
``max_wait`` seconds while their images fit in ``max_batch``, runs the model once on all of
them and hands each request its rows. It waits only while another request is on its way
(queued, or announced by :meth:`Batcher.arriving` while its images are decoded): a lone
request runs at once instead of paying ``max_wait``. A request is never split (a request larger than
``max_batch`` runs alone), and only requests with the same number of views (test-time
augmentation on or off) share a call. ``max_batch=1`` turns batching off: one request per call.

Hand-written because FastAPI/uvicorn have no batching, and LitServe's (``max_batch_size``,
``batch_timeout``) needs the model in its own worker processes, which doubles the memory of a
served model and cannot share the Predictor that ``finetune predict`` uses.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_CLOSE = object()  # put in the queue by close()


@dataclass
class _Request:
    views: torch.Tensor  # (N, V, C, S, S): N images, V views each
    future: Future = field(default_factory=Future)

    def __len__(self) -> int:
        return len(self.views)


class Batcher:
    """Runs ``forward`` (a list of V view batches (N, C, S, S) -> (N, classes)) on one thread,
    over the images of as many waiting requests as fit in ``max_batch``."""

    def __init__(self, forward: Callable[[list[torch.Tensor]], torch.Tensor],
                 max_batch: int = 32, max_wait: float = 0.005) -> None:
        self.forward, self.max_batch, self.max_wait = forward, max_batch, max_wait
        self._queue: queue.Queue = queue.Queue()  # _Request, or _CLOSE
        self._carried = None  # taken from the queue, but did not fit the last call
        self._thread = threading.Thread(target=self._loop, name="finetune-batcher",
                                        daemon=True)
        self.calls = 0  # model calls so far (the load test reports images per call)
        self._arriving = 0  # requests announced (decoding their images), not yet submitted
        self._lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._queue.put(_CLOSE)
        self._thread.join()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Around a request's decoding and :meth:`submit`: the model thread may wait for it."""
        with self._lock:
            self._arriving += 1
        try:
            yield
        finally:
            with self._lock:
                self._arriving -= 1

    def submit(self, views: torch.Tensor) -> Future:
        """Queue N images' views (N, V, C, S, S); the future gets their outputs (N, classes)."""
        request = _Request(views)
        self._queue.put(request)
        return request.future

    def _next_group(self) -> list[_Request] | None:
        """The requests of the next model call (None: closed)."""
        first = self._queue.get() if self._carried is None else self._carried
        self._carried = None
        if first is _CLOSE:
            return None
        group, size = [first], len(first)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            if self._queue.empty() and not self._arriving:
                break  # nothing on its way: no reason to wait
            try:  # short waits: an announced request may turn out to be a bad one
                item = self._queue.get(timeout=min(max(deadline - time.monotonic(), 0), 1e-3))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                continue
            if (item is _CLOSE or item.views.shape[1:] != first.views.shape[1:]
                    or size + len(item) > self.max_batch):
                self._carried = item  # the next call starts with it (or closes)
                break
            group.append(item)
            size += len(item)
        return group

    def _loop(self) -> None:
        while (group := self._next_group()) is not None:
            views = torch.cat([r.views for r in group])
            try:
                with torch.inference_mode():
                    out = self.forward(list(views.unbind(1)))
            except Exception as e:  # every waiting request gets the error, the thread goes on
                for r in group:
                    r.future.set_exception(e)
                continue
            self.calls += 1
            for r, rows in zip(group, out.split([len(r) for r in group]), strict=True):
                r.future.set_result(rows)
        while not self._queue.empty():  # closing: a request still waiting gets an answer
            item = self._queue.get()
            if item is not _CLOSE:
                item.future.set_exception(RuntimeError("the server is shutting down"))

"""Stage two's data feed: the next batches are made on a thread (read from memory or streamed from the
store) while the model computes, pinned when bound for a GPU (features as stored, float16, converted to
float32 there) and copied there without blocking.

:class:`Feed` yields (sample, target) on the device in the order given; the values are the ones
``data.batch`` gives in the loop itself, so a fed fit equals an unfed one bit for bit. ``waited``
counts the seconds the loop spent waiting for data (a fit's history records it per epoch).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from train.data.readers import ImageSample, Sample, SplitData

__all__ = ["Feed"]


class Feed:
    """Batches ``batches`` ((rows, views) each) of ``data`` on ``device``, ``depth`` of them made ahead."""

    def __init__(self, data: SplitData, batches: Sequence[tuple[list[int], list[int]]], device: torch.device,
                 depth: int = 2) -> None:
        self.data, self.batches, self.device, self.depth = data, list(batches), device, max(1, depth)
        self.waited = 0.0

    def _make(self, rows: list[int], views: list[int]) -> Sample | ImageSample:
        """A batch as it travels: on the CPU as the loop reads it; for a GPU with float16 features (converted
        there), pinned with the fit's device current (this thread's own: pinned memory belongs to a device)."""
        if self.device.type != "cuda":
            return self.data.batch(rows, views)
        sample = self.data.batch(rows, views, half=True)
        with torch.cuda.device(self.device):
            return sample.pin()

    def __iter__(self) -> Iterator[tuple[Sample | ImageSample, torch.Tensor]]:
        with ThreadPoolExecutor(1, thread_name_prefix="textdiff-feed") as pool:
            ahead: deque[Future] = deque(pool.submit(self._make, *b) for b in self.batches[:self.depth])
            queued = len(ahead)
            while ahead:
                t0 = time.perf_counter()
                sample = ahead.popleft().result()
                self.waited += time.perf_counter() - t0
                if queued < len(self.batches):
                    ahead.append(pool.submit(self._make, *self.batches[queued]))
                    queued += 1
                yield (sample.to(self.device, non_blocking=True),
                       sample.target.to(self.device, non_blocking=True))

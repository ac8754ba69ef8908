"""Stage wall-clock times (and, on CUDA, peak GPU memory) without hand-kept timers.

clock = Clock()
with clock("heal"):
    ...
clock.seconds   # {"heal": 12.3}; entering the same name again adds to it
clock.peak_mib  # {"heal": 20480.0}: torch.cuda.max_memory_allocated during the stage (CUDA only)
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch


class Clock:
    def __init__(self, cuda: bool | None = None):
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}
        self.cuda = torch.cuda.is_available() if cuda is None else cuda

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() / 2**20
                self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), peak)

    def __getitem__(self, name: str) -> float:
        return self.seconds.get(name, 0.0)

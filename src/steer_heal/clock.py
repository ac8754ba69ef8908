"""Stage wall-clock times without hand-kept timers.

clock = Clock()
with clock("heal"):
    ...
clock.seconds   # {"heal": 12.3}; entering the same name again adds to it
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class Clock:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.time() - t0

    def __getitem__(self, name: str) -> float:
        return self.seconds.get(name, 0.0)

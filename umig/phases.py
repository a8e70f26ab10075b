"""Where a migration's time goes. Each side notes the end of each of its steps; `umig migrate
--json` reports both lists (`phases`: source and target, milliseconds per step, in order).
Durations, not timestamps: the two sides' clocks need not agree."""
import time


class Phases:
    def __init__(self):
        self.steps = []  # [name, milliseconds since the previous step ended]
        self._last = time.monotonic()

    def mark(self, name):
        now = time.monotonic()
        self.steps.append([name, round((now - self._last) * 1e3, 3)])
        self._last = now

"""The default progress bar: Lightning's tqdm bar, redrawn at most ``max_per_second`` times a second.

Lightning's Rich bar redraws from a thread of its own, which takes the GIL from the training thread whenever
it draws (its own CPU time was ~1% of a resnet_micro run drawn in a terminal). This bar has no thread: it
draws in the training thread, and only once 1/max_per_second seconds have passed (and always at a bar's
end), so a fast step costs one clock read (0.01 ms here), a slow one is still shown every step, and a redraw
costs ~0.5-1.5 ms (timed per hook in resnet_micro and MAE runs on digits: 4-5 ms an epoch in all).
"""

from __future__ import annotations

import time

from pytorch_lightning.callbacks import TQDMProgressBar


class ThrottledProgressBar(TQDMProgressBar):
    def __init__(self, max_per_second: float = 10.0, **kwargs):
        super().__init__(refresh_rate=1, **kwargs)
        self.min_interval = 1.0 / max_per_second
        self._last_draw = float("-inf")

    def _should_update(self, current: int, total: int) -> bool:
        # Lightning asks this after every batch of every bar (train, validation, test, predict).
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.min_interval:
            self._last_draw = now
            return True
        return False

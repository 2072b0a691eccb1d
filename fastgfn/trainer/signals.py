"""Stopping a run cleanly: SIGTERM or SIGINT finish the current step, save a checkpoint and
exit with status 0. Every rank must stop at the same step, so the flag is all-reduced."""

from __future__ import annotations

import signal

from fastgfn.trainer.engines.distributed import all_ranks_max


class StopSignals:
    """Inside the block SIGTERM and SIGINT only set a flag; ``requested()`` (called by every
    rank once per step) says which signal any rank received, or None."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._previous = {}

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    def _on_signal(self, signum, frame):
        self.received = signum

    def requested(self) -> int | None:
        return all_ranks_max(int(self.received or 0)) or None

"""Notice that a served model's weight files changed on disk (a retrain or copy into its folder).

The loaded model is not affected (its tensors are its own, :mod:`rcllm_sdk.model.weights`): it keeps
serving the weights it loaded, under their fingerprint, until ``RcRecommender.reload()``. The
watch only says so, once per change, checking file stamps at most every ``every_s`` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger("rcllm_sdk.model")


class WeightsWatch:
    def __init__(self, every_s: float = 30.0):
        self.every_s = every_s
        self._next_check = 0.0
        self._reported: frozenset[Path] = frozenset()
        self._lock = threading.Lock()

    def check(self, ranker) -> list[Path]:
        """The changed weight files of ``ranker`` (empty between checks); a new change is logged."""
        now = time.monotonic()
        with self._lock:
            if now < self._next_check:
                return []
            self._next_check = now + self.every_s
        changed = ranker.changed_files()
        if changed and frozenset(changed) != self._reported:
            self._reported = frozenset(changed)
            log.warning(
                "the weight files of the served model changed on disk (%s); still serving the weights "
                "loaded (fingerprint %s) until reload()",
                ", ".join(str(p) for p in changed),
                ranker.fingerprint,
            )
        return changed

"""Swap a recommender's model while it serves: :meth:`RcRecommender.reload` on demand, or a thread that
follows a registry alias (``models:/rcllm-ranker@champion``, ``follow_alias=True``).

The new ranker and its engine are built beside the serving ones (serving goes on meanwhile), then
swapped in under a writer lock that waits for the requests in flight: a request runs wholly on one
model version, and each :class:`Recommendation` names it (``model_version``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

log = logging.getLogger("rcllm_sdk.serving")

# What a swap replaces: everything built from the ranker (the rest is shared with the old model).
_KEPT = ("features", "retriever", "config", "swap_lock", "follower", "model_source")


class SwapLock:
    """Many requests at once, or one model swap: a swap waits for the requests in flight, and new
    requests wait for a pending swap (so a stream of requests cannot starve it)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers, self._writing, self._waiting = 0, False, 0
        self.reloading = threading.Lock()  # one reload at a time (the follower and reload())

    @contextlib.contextmanager
    def reading(self):
        with self._cond:
            while self._writing or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._cond:
            self._waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def source_version(source: str | Path) -> str:
    """What ``source`` names now: a registry URI's version, or a folder's fingerprint (a folder such
    as ``<repo>/data/ranker`` may be a link that ``rcllm train`` moves)."""
    text = str(source)
    if text.startswith("models:/"):
        from .model.sources import registry_version

        return registry_version(text)
    from .model.ranker import fingerprint

    return fingerprint(Path(text).resolve())


def reload(rec) -> bool:
    """Load the model ``rec.model_source`` names now and swap it in if it differs from the served one;
    True when it did. The old engine's store is closed after the swap."""
    source = getattr(rec, "model_source", None)
    if source is None:
        return False
    with rec.swap_lock.reloading:
        current = source_version(source)
        if current in (rec.ranker.version, rec.ranker.fingerprint):
            return False
        fresh = _build(rec, source)
        with rec.swap_lock.writing():
            old_engine = rec.engine
            for name, value in vars(fresh).items():
                if name not in _KEPT:
                    setattr(rec, name, value)
        if old_engine is not None:
            old_engine.close()
            old_engine.store.close()
        log.info("now serving model %s (from %s)", rec.model_version, source)
        return True


def _build(rec, source):
    from .model.ranker import load_ranker
    from .model.sources import pinned_uri, registry_version

    text = str(source)
    if text.startswith("models:/") and "@" in text:
        source = pinned_uri(text, registry_version(text))  # the version checked is the version loaded
    ranker = load_ranker(source, dtype=rec.config.dtype, device=rec.config.device)
    return type(rec)(rec.features, rec.retriever, ranker, rec.config)


class AliasFollower:
    """A daemon thread that calls :func:`reload` every ``interval_s`` seconds (errors are logged and
    serving stays on the model it has)."""

    def __init__(self, rec, interval_s: float = 60.0):
        self.rec, self.interval_s = rec, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rcllm-follow-alias", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                reload(self.rec)
            except Exception as exc:  # a registry or load failure must not stop serving
                log.warning("could not follow %s: %s", self.rec.model_source, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

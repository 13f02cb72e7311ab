"""Training curves collected while a ranker trains, for the MLflow run that logs them afterwards.

Training code calls :func:`record` at each step (a no-op when nobody collects); ``rcllm train`` wraps
training in :func:`collect` and logs the points as MLflow metrics with their steps.
"""

from __future__ import annotations

import contextlib
import threading

_local = threading.local()


@contextlib.contextmanager
def collect():
    """Collect the points :func:`record` sees in this thread: ``{name: [(step, value), ...]}``."""
    previous = getattr(_local, "curves", None)
    _local.curves = curves = {}
    try:
        yield curves
    finally:
        _local.curves = previous


def record(name: str, value: float, step: int | None = None) -> None:
    """One point of curve ``name`` (``step`` defaults to the curve's next index)."""
    curves = getattr(_local, "curves", None)
    if curves is None:
        return
    points = curves.setdefault(name, [])
    points.append((len(points) if step is None else step, float(value)))

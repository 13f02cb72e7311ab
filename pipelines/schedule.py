"""``rcllm schedule``: the pipeline chain every interval, in this process (APScheduler).

One run at a time: a run still going when the next is due is skipped (``max_instances=1``), and
the repo's pipeline lock keeps out runs started elsewhere (cron, another scheduler). A failed run
is logged and the schedule goes on; serving stays on the champion it had.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from datetime import datetime, timezone

from rcllm_sdk.errors import ConfigError, RcLLMError

from .pipeline import PipelineConfig, run_pipeline

log = logging.getLogger("rcllm_sdk.pipelines")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_interval(text: str) -> float:
    """Seconds of ``90s``, ``30m``, ``1h``, ``1d`` (a bare number is seconds)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found or float(found.group(1)) <= 0:
        raise ConfigError(f"interval {text!r}: use a positive number with s, m, h or d, e.g. 1h")
    return float(found.group(1)) * UNITS[found.group(2) or "s"]


def schedule(make_config: Callable[[], PipelineConfig], every: str, runs: int | None = None) -> int:
    """Run the pipeline now and every ``every`` (``runs`` times, or until interrupted); the runs made.
    ``make_config`` builds each run's settings (a fresh run id every time)."""
    from apscheduler.schedulers.background import BackgroundScheduler

    done, finished = [0], threading.Event()

    def job() -> None:
        try:
            for step, outcome in run_pipeline(make_config()).items():
                print(
                    f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} {step}: {outcome['status']}", flush=True
                )
        except RcLLMError as exc:
            log.error("pipeline run failed: %s", exc)
        done[0] += 1
        if runs is not None and done[0] >= runs:
            finished.set()

    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # a skipped overlapping run is expected
    scheduler = BackgroundScheduler(timezone=timezone.utc)
    scheduler.add_job(
        job,
        "interval",
        seconds=parse_interval(every),
        next_run_time=datetime.now(timezone.utc),
        max_instances=1,
        coalesce=True,
    )
    scheduler.start()
    try:
        finished.wait()
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.shutdown(wait=True)
    return done[0]

"""``rcllm pipeline run``: retrain -> evaluate -> promote -> refresh -> gc over one feature repo.

Each step is idempotent and resumable: what a step decided is kept in
``<repo>/data/pipeline/state.json`` (one *cycle* per data cut-off: the newest interaction timestamp
the challenger was trained on), so a run after a failure picks up where the last stopped and a run
with no new data since the champion's cut-off trains nothing. A file lock keeps two runs apart.
Serving only changes in ``promote``, after the challenger's blocks are in the store: a step that
fails leaves the previous champion serving and its blocks intact. Each step is an MLflow run
(experiment ``rcllm-pipeline``; the retrain step's run is the ``rcllm-train`` run) tagged with the
pipeline run's id.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from rcllm_sdk.errors import ConfigError, PipelineBusyError, PipelineStepError

STEPS = ("retrain", "evaluate", "promote", "refresh", "gc")
STATE = Path("data") / "pipeline" / "state.json"
LOCK = Path("data") / "pipeline" / "lock"

log = logging.getLogger("rcllm_sdk.pipelines")


@dataclass(slots=True)
class PipelineConfig:
    """Settings of one pipeline run.

    Attributes:
        repo: the ingested feature repo.
        steps: which steps to run, in chain order.
        store: the serving KV store the refresh fills and gc cleans (``fs://``, ``lm://``,
            ``redis://``, ``cluster://``; ``memory://NAME`` in tests).
        model_name: the registered model (default ``rcllm-ranker``).
        margin: promote only when the challenger's NDCG@10 beats the champion's by more than this.
        train: training settings (a ``TrainConfig``; None: ``TrainConfig.resolve()``).
        max_users: validation users compared (None: all).
        active_days: refresh only users active this recently (None: all).
        evaluate_modes: also ``rcllm evaluate`` the challenger (every mode and policy on the test
            users, ``timing_samples`` warm requests each): the ``rcllm-evaluate`` run and figures.
        point_in_time: the retrain reads training histories from Feast's offline store as of each
            user's first held-out interaction (``pipelines.point_in_time``); False: from parquet.
        progress: progress bars while training.
    """

    repo: Path
    steps: tuple[str, ...] = STEPS
    store: str = "local://"
    model_name: str | None = None
    margin: float = 0.0
    train: object = None
    max_users: int | None = None
    active_days: float | None = None
    point_in_time: bool = True
    evaluate_modes: bool = True
    timing_samples: int = 10
    progress: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self):
        self.repo = Path(self.repo)
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown:
            raise ConfigError(f"unknown pipeline step(s) {unknown}; choose from {','.join(STEPS)}")
        self.steps = tuple(s for s in STEPS if s in self.steps)


class State:
    """The pipeline's memory between runs (``state.json``), written atomically after every change."""

    def __init__(self, repo: Path):
        self.path = Path(repo) / STATE
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    @property
    def cycle(self) -> dict:
        return self.data.setdefault("cycle", {})

    def new_cycle(self, cutoff: int) -> dict:
        self.data["cycle"] = {"cutoff": cutoff}
        return self.data["cycle"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


@contextlib.contextmanager
def pipeline_lock(repo: Path):
    """Hold the repo's pipeline lock, or raise :class:`PipelineBusyError` at once."""
    import fcntl

    path = Path(repo) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise PipelineBusyError(f"another pipeline run holds {path}; try again when it ends") from exc
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_pipeline(config: PipelineConfig) -> dict:
    """Run ``config.steps`` in order under the lock; ``{step: outcome}``. A failing step raises (its
    error names the step) and leaves the steps after it for the next run.

    Example:
        >>> run_pipeline(PipelineConfig("feature_repo/", store="fs:///var/cache/rcllm"))
    """
    from rcllm_sdk.tracking import configure

    from . import jobs

    configure(config.repo)
    outcomes = {}
    with pipeline_lock(config.repo):
        state = State(config.repo)
        for step in config.steps:
            started = time.perf_counter()
            try:
                outcome = getattr(jobs, step)(config, state)
            except Exception as exc:
                raise PipelineStepError(
                    f"pipeline step {step} failed ({exc}); serving stays on the current champion; "
                    "run the pipeline again to resume"
                ) from exc
            finally:
                state.save()
            outcome["seconds"] = round(time.perf_counter() - started, 2)
            outcomes[step] = outcome
            log.info("pipeline %s: %s", step, outcome.get("status"))
    return outcomes

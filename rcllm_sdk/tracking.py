"""MLflow logging, kept off the request path: every call here happens after the work is done."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

DEFAULT_URI = "sqlite:///mlflow.db"


def _mlflow():
    import mlflow  # lazy: heavy import

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_URI)
    return mlflow


def flat_metrics(tree: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """Numeric leaves of a nested dict as ``a.b.c`` names (lists ``[lo, hi]`` become ``_lo``/``_hi``)."""
    for key, value in tree.items():
        name = f"{prefix}{key}".replace("@", "_at_").replace(":", "_")  # MLflow names allow neither
        if isinstance(value, dict):
            yield from flat_metrics(value, f"{name}.")
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            yield name, float(value)
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            yield f"{name}_lo", float(value[0])
            yield f"{name}_hi", float(value[1])


def log_run(experiment: str, params: dict, metrics: dict, artifacts: dict[str, Path] | None = None) -> str:
    """One MLflow run with ``params``, nested ``metrics`` and files/folders; returns the run id."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        mlflow.log_metrics(dict(flat_metrics(metrics)))
        for name, path in (artifacts or {}).items():
            if Path(path).is_dir():
                mlflow.log_artifacts(str(path), artifact_path=name)
            else:
                mlflow.log_artifact(str(path), artifact_path=name)
        return run.info.run_id

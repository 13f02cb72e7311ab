"""MLflow logging, kept off the request path: every call here happens after the work is done.

Where runs go: ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo>/data/mlflow.db`` beside the
feature repo the command works on (``~/.cache/rcllm/mlflow.db`` for commands without a repo), never
the working directory. Every experiment the SDK creates gets an explicit artifact location beside a
sqlite store (``<store dir>/mlartifacts/<experiment>``): MLflow's own default is ``./mlruns``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

FALLBACK_STORE = Path.home() / ".cache" / "rcllm" / "mlflow.db"


def tracking_uri(repo: str | Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI``, else the sqlite store under ``<repo>/data`` (or the user cache)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    path = Path(repo) / "data" / "mlflow.db" if repo is not None else FALLBACK_STORE
    path.parent.mkdir(parents=True, exist_ok=True)
    return "sqlite:///" + str(path.resolve())


def artifact_location(uri: str, experiment: str) -> str | None:
    """Artifact folder of ``experiment`` beside a sqlite store; None lets the server or file store choose."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///")).resolve()
    return (db.parent / "mlartifacts" / experiment).as_uri()


def configure(repo: str | Path | None = None):
    """The ``mlflow`` module pointed at :func:`tracking_uri` (lazy import: MLflow is heavy)."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(repo))
    return mlflow


def use_experiment(name: str, repo: str | Path | None = None) -> str:
    """Make ``name`` the active experiment, creating it with an explicit artifact location; its id."""
    mlflow = configure(repo)
    found = mlflow.get_experiment_by_name(name)
    if found is None:
        location = artifact_location(mlflow.get_tracking_uri(), name)
        experiment_id = mlflow.create_experiment(name, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextlib.contextmanager
def start_run(
    experiment: str,
    repo: str | Path | None = None,
    run_name: str | None = None,
    tags: dict | None = None,
    nested: bool = False,
):
    """An MLflow run in ``experiment`` (nested under the active run with ``nested``), tagged with the
    git commit of the code and ``tags``."""
    import mlflow

    if not (nested and mlflow.active_run()):
        use_experiment(experiment, repo)
    commit = git_commit()
    all_tags = {**({"mlflow.source.git.commit": commit} if commit else {}), **(tags or {})}
    with mlflow.start_run(run_name=run_name, nested=nested, tags=all_tags) as run:
        yield run


def git_commit() -> str | None:
    """The commit of the checkout this code runs from, or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


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


def log_params(params: dict) -> None:
    """Params of the active run, values cut to MLflow's 500 characters."""
    import mlflow

    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})


def log_artifacts(artifacts: dict[str, Path]) -> None:
    """Files or folders into the active run, each under its artifact path."""
    import mlflow

    for name, path in artifacts.items():
        if Path(path).is_dir():
            mlflow.log_artifacts(str(path), artifact_path=name)
        else:
            mlflow.log_artifact(str(path), artifact_path=name)


def log_run(
    experiment: str,
    params: dict,
    metrics: dict,
    artifacts: dict[str, Path] | None = None,
    repo: str | Path | None = None,
    tags: dict | None = None,
) -> str:
    """One MLflow run with ``params``, nested ``metrics`` and files/folders; returns the run id."""
    import mlflow

    with start_run(experiment, repo, tags=tags) as run:
        log_params(params)
        mlflow.log_metrics(dict(flat_metrics(metrics)))
        log_artifacts(artifacts or {})
        return run.info.run_id

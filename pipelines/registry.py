"""Versioned model folders and the MLflow model registry.

``rcllm train`` saves each ranker to a new folder ``<repo>/data/models/v<N>`` and points
``<repo>/data/ranker`` (a symlink, swapped atomically) at it, so the default serving path keeps
working and older models stay on disk. The MLflow side: the Hugging Face folder is logged under
``model`` in the train run and registered as a version of ``rcllm-ranker`` (``source`` the run's
``model`` artifacts), which is the one format ``models:/rcllm-ranker@champion`` loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_MODEL_NAME = "rcllm-ranker"
CHAMPION = "champion"
MODELS_DIR = Path("data") / "models"
CURRENT = Path("data") / "ranker"


def model_name(name: str | None = None) -> str:
    """The registered model's name: ``name``, else ``RCLLM_REGISTERED_MODEL``, else ``rcllm-ranker``."""
    return name or os.environ.get("RCLLM_REGISTERED_MODEL") or DEFAULT_MODEL_NAME


def next_model_dir(repo: Path) -> Path:
    """``<repo>/data/models/v<N>``, N one past the highest existing folder (created, empty)."""
    root = Path(repo) / MODELS_DIR
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"v(\d+)", p.name))]
    folder = root / f"v{max(taken, default=0) + 1}"
    folder.mkdir()
    return folder


def point_current(repo: Path, model_dir: Path) -> Path:
    """Make ``<repo>/data/ranker`` point at ``model_dir`` in one rename (readers see old or new).

    A real folder there (a repo trained before versioned folders) first moves to the next ``v<N>``."""
    current = Path(repo) / CURRENT
    if current.is_dir() and not current.is_symlink():
        target = next_model_dir(repo)
        target.rmdir()
        current.rename(target)
    link = current.with_name(f".ranker.{os.getpid()}.tmp")
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(Path(model_dir).resolve(), current.parent.resolve()))
    os.replace(link, current)
    return current


def register(run, model_dir: Path, name: str | None = None, tags: dict | None = None) -> str:
    """Log ``model_dir`` under ``model`` in ``run`` (the active run) and register it; the version."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.log_artifacts(str(model_dir), artifact_path="model")
    client, name = MlflowClient(), model_name(name)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="rcllm_sdk ranker: a Hugging Face folder")
    version = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
    )
    return str(version.version)


def champion(name: str | None = None):
    """The registry's ``champion`` version of ``name`` (an MLflow ``ModelVersion``), or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(model_name(name), CHAMPION)
    except MlflowException:
        return None


def set_champion(version: str, name: str | None = None) -> None:
    """Move the ``champion`` alias of ``name`` to ``version``."""
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(model_name(name), CHAMPION, str(version))


def model_version(version: str, name: str | None = None):
    """Version ``version`` of ``name`` (an MLflow ``ModelVersion``)."""
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(model_name(name), str(version))


def registry_uri(version: str | None = None, name: str | None = None) -> str:
    """``models:/<name>/<version>``, or ``models:/<name>@champion`` without a version."""
    return f"models:/{model_name(name)}/{version}" if version else f"models:/{model_name(name)}@{CHAMPION}"


def lookup(model: str | Path | None) -> tuple[str, str]:
    """``(registry version, train run id)`` of a model given as a ``models:/`` or ``runs:/`` URI or a
    folder ``rcllm train`` saved (``("", "")`` when the registry does not know it)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client, text = MlflowClient(), str(model or "")
    try:
        if text.startswith("models:/"):
            registered, _, alias = text.removeprefix("models:/").split("/")[0].partition("@")
            found = [
                client.get_model_version_by_alias(registered, alias)
                if alias
                else client.get_model_version(registered, text.removeprefix("models:/").split("/")[1])
            ]
        elif text.startswith("runs:/"):
            found = client.search_model_versions(f"run_id = '{text.removeprefix('runs:/').split('/')[0]}'")
        else:
            folder = str(Path(text).resolve()) if text else ""
            found = client.search_model_versions(f"tags.`rcllm.model_dir` = '{folder}'")
    except (MlflowException, IndexError):
        return "", ""
    return (str(found[0].version), found[0].run_id or "") if found else ("", "")


def trained_on(repo: Path, cutoff: int, name: str | None = None):
    """The newest version of ``name`` trained on ``repo`` at data cut-off ``cutoff`` whose folder is
    still on disk (an MLflow ``ModelVersion``), or None."""
    from mlflow import MlflowClient

    folder = str(Path(repo).resolve())
    found = [
        v
        for v in MlflowClient().search_model_versions(f"name = '{model_name(name)}'")
        if v.tags.get("rcllm.feature_repo") == folder
        and v.tags.get("rcllm.data_cutoff") == str(cutoff)
        and (Path(v.tags.get("rcllm.model_dir", "")) / "config.json").exists()
    ]
    return max(found, key=lambda v: int(v.version), default=None)

"""The pipeline's steps (see :mod:`.pipeline`): each takes the run's config and the state kept
between runs, returns its outcome (``status`` says what it did) and logs one MLflow run."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import registry
from .pipeline import PipelineConfig, State

EXPERIMENT = "rcllm-pipeline"


def retrain(config: PipelineConfig, state: State) -> dict:
    """Train a challenger on the repo as it is now, unless the champion (or this cycle's challenger)
    has already seen every interaction in it."""
    from .run import data_cutoff, train_from_repo

    cutoff = data_cutoff(config.repo)
    cycle = state.cycle
    if cycle.get("cutoff") == cutoff and cycle.get("challenger") and "decision" in cycle:
        return {"status": f"no new data since the last run's cut-off {cutoff}: nothing to train"}
    if cycle.get("cutoff") == cutoff and cycle.get("challenger"):
        return {"status": "resumed: challenger already trained on this data", **_brief(cycle["challenger"])}
    champion = registry.champion(config.model_name)
    if champion is not None and cutoff <= int(champion.tags.get("rcllm.data_cutoff", -1)):
        state.new_cycle(cutoff)["challenger"] = None
        return {"status": f"no new data since the champion's cut-off {cutoff}: nothing to train"}
    trained = registry.trained_on(config.repo, cutoff, config.model_name)
    if trained is not None and (champion is None or str(trained.version) != str(champion.version)):
        state.new_cycle(cutoff)["challenger"] = {
            "version": str(trained.version),
            "model_dir": trained.tags["rcllm.model_dir"],
            "run_id": trained.run_id,
        }
        return {
            "status": f"adopted v{trained.version}, already trained on this data",
            **_brief(state.cycle["challenger"]),
        }
    folder = registry.next_model_dir(config.repo)
    try:
        result = train_from_repo(
            config.repo,
            folder,
            config.train,
            progress=config.progress,
            model_name=config.model_name,
            tags=_tags(config, "retrain"),
            point_in_time=config.point_in_time,
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a half-written model is never served
        raise
    state.new_cycle(cutoff)["challenger"] = {
        "version": result["version"],
        "model_dir": str(Path(result["model_dir"]).resolve()),
        "run_id": result["run_id"],
    }
    return {"status": f"trained challenger v{result['version']}", **_brief(state.cycle["challenger"])}


def evaluate(config: PipelineConfig, state: State) -> dict:
    """Challenger against champion on the same validation users (paired interval)."""
    import mlflow

    from rcllm_sdk.tracking import flat_metrics, start_run

    from .compare import compare

    challenger = state.cycle.get("challenger")
    if not challenger:
        return {"status": "no challenger: nothing to evaluate"}
    if "evaluation" in state.cycle:
        return {"status": "resumed: already evaluated", **state.cycle["evaluation"]}
    champion = registry.champion(config.model_name)
    champion_dir = _model_dir(champion) if champion is not None else None
    evaluation = compare(config.repo, challenger["model_dir"], champion_dir, config.max_users)
    evaluation["champion_version"] = str(champion.version) if champion is not None else None
    tags = {
        **_tags(config, "evaluate"),
        "rcllm.model_version": challenger["version"],
        "rcllm.train_run_id": challenger["run_id"],
    }
    with start_run(EXPERIMENT, config.repo, run_name="evaluate", tags=tags):
        mlflow.log_metrics(
            dict(flat_metrics({k: v for k, v in evaluation.items() if k != "champion_version"}))
        )
        for role in ("challenger", "champion"):
            if role in evaluation:
                version = challenger["version"] if role == "challenger" else str(champion.version)
                with start_run(EXPERIMENT, config.repo, run_name=f"{role} v{version}", nested=True):
                    mlflow.set_tags({"rcllm.model_version": version, "rcllm.role": role})
                    mlflow.log_metrics(dict(flat_metrics(evaluation[role])))
    if config.evaluate_modes:
        _evaluate_modes(config, challenger["model_dir"], tags)
    state.cycle["evaluation"] = evaluation
    return {"status": "evaluated", **evaluation}


def _evaluate_modes(config: PipelineConfig, model: str, tags: dict) -> None:
    """``rcllm evaluate`` of the challenger on the test users: the ``rcllm-evaluate`` parent run with
    nested per-mode runs and figures, tagged with this pipeline run."""
    from rcllm_sdk.evaluation.evaluate import EvaluateConfig
    from rcllm_sdk.evaluation.evaluate import evaluate as evaluate_every_mode

    settings = EvaluateConfig(
        source=None,
        repo=config.repo,
        model=model,
        max_users=config.max_users,
        timing_samples=config.timing_samples,
        progress=config.progress,
        mlflow_tags={k: v for k, v in tags.items() if k.startswith("rcllm.pipeline")},
    )
    evaluate_every_mode(settings)


def promote(config: PipelineConfig, state: State) -> dict:
    """Move the alias ``champion`` to the challenger when it is better by the margin, after its blocks
    are in the store; otherwise keep the champion and say why."""
    import mlflow

    from rcllm_sdk.tracking import log_params, start_run

    from .blocks import refresh_version
    from .cluster_map import place_catalog
    from .compare import decide

    cycle = state.cycle
    challenger, evaluation = cycle.get("challenger"), cycle.get("evaluation")
    if not challenger or evaluation is None:
        return {"status": "no evaluated challenger: nothing to promote"}
    if "decision" in cycle:
        return {"status": f"resumed: {cycle['decision']['reason']}", **cycle["decision"]}
    chosen, reason = decide(evaluation, config.margin)
    tags = {**_tags(config, "promote"), "rcllm.model_version": challenger["version"]}
    with start_run(EXPERIMENT, config.repo, run_name="promote", tags=tags):
        log_params({"margin": config.margin, "promoted": chosen, "reason": reason})
        if chosen:
            place_catalog(config.repo, config.store)  # new items' blocks go straight to their shards
            figures = refresh_version(
                config.repo, challenger["model_dir"], config.store, challenger["version"]
            )
            mlflow.log_metrics({f"warm_{k}": v for k, v in figures.items() if isinstance(v, (int, float))})
            registry.set_champion(challenger["version"], config.model_name)
            registry.point_current(config.repo, Path(challenger["model_dir"]))
    cycle["decision"] = {"promoted": chosen, "reason": reason, "version": challenger["version"]}
    status = f"promoted v{challenger['version']}" if chosen else "kept the champion"
    return {"status": f"{status}: {reason}", **cycle["decision"]}


def refresh(config: PipelineConfig, state: State) -> dict:
    """Blocks of the champion the store lacks: changed items and histories (new content hashes),
    and, on a ``cluster://`` store whose shard map no longer has the catalog's items, the map
    updated first (new items placed, re-balanced) and new and moved items' blocks on their shards."""
    import mlflow

    from rcllm_sdk.tracking import start_run

    from .blocks import refresh_version
    from .cluster_map import place_catalog

    champion = registry.champion(config.model_name)
    if champion is None:
        return {"status": "no champion: nothing to refresh"}
    tags = {**_tags(config, "refresh"), "rcllm.model_version": str(champion.version)}
    with start_run(EXPERIMENT, config.repo, run_name="refresh", tags=tags):
        placement = place_catalog(config.repo, config.store)
        figures = refresh_version(
            config.repo, _model_dir(champion), config.store, str(champion.version), config.active_days
        )
        mlflow.log_metrics({k: v for k, v in figures.items() if isinstance(v, (int, float))})
        _log_refresh_figure(figures)
    status = f"refreshed v{champion.version}: {figures['computed']} blocks computed"
    if placement.get("shard_map_added") or placement.get("shard_map_dropped"):
        status += f"; shard map v{placement['shard_map_version']}: {placement['shard_map_added']} items added"
        status += f", {placement['shard_map_moved']} moved"
    return {"status": status, **figures, **placement}


def gc(config: PipelineConfig, state: State) -> dict:
    """Delete the blocks of every version but the champion (from the refresh manifests)."""
    import mlflow

    from rcllm_sdk.model.ranker import fingerprint
    from rcllm_sdk.tracking import start_run

    from .blocks import collect_garbage

    champion = registry.champion(config.model_name)
    if champion is None:
        return {"status": "no champion: nothing to collect"}
    keep = {fingerprint(_model_dir(champion))}
    with start_run(EXPERIMENT, config.repo, run_name="gc", tags=_tags(config, "gc")):
        out = collect_garbage(config.repo, config.store, keep)
        mlflow.log_metrics({"deleted": out["deleted"], "not_deleted": out["not_deleted"]})
        mlflow.set_tag("rcllm.collected_versions", ",".join(map(str, out["versions"])))
    return {"status": f"deleted {out['deleted']} blocks of {len(out['versions'])} old version(s)", **out}


def _model_dir(version) -> str:
    """A registry version's local folder when it is still on disk, else its ``models:/`` URI."""
    folder = version.tags.get("rcllm.model_dir")
    if folder and (Path(folder) / "config.json").exists():
        return folder
    return registry.registry_uri(str(version.version), version.name)


def _tags(config: PipelineConfig, step: str) -> dict:
    return {"rcllm.pipeline_run": config.run_id, "rcllm.step": step, "rcllm.feature_repo": str(config.repo)}


def _brief(challenger: dict) -> dict:
    return {"version": challenger["version"], "train_run_id": challenger["run_id"]}


def _log_refresh_figure(figures: dict) -> None:
    import tempfile

    import mlflow

    from rcllm_sdk.evaluation.figures import bar_chart

    with tempfile.TemporaryDirectory() as tmp:
        counts = {k: figures[k] for k in ("blocks", "computed", "already_stored", "write_failures")}
        path = bar_chart(counts, Path(tmp) / "refresh_blocks.png", "blocks", "refresh")
        mlflow.log_artifact(str(path), artifact_path="figures")

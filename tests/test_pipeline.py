"""The retrain -> evaluate -> promote -> refresh -> gc pipeline on a temp repo, a memory store and the
session's temporary MLflow store: ingest, train, a first run (champion v1), new interactions, a run
whose refresh fails (v1 keeps serving), the resumed run (v2 promoted, v1's blocks collected), and
what MLflow shows for it."""

import uuid

import mlflow
import numpy as np
import polars as pl
import pytest
from mlflow import MlflowClient

from rcllm_sdk import RcRecommender
from rcllm_sdk.cache import open_store
from rcllm_sdk.cache.memory import _SPACES
from rcllm_sdk.errors import PipelineBusyError, PipelineStepError
from rcllm_sdk.ingest import ingest
from rcllm_sdk.ingest_append import append_interactions
from rcllm_sdk.model.ranker import fingerprint
from rcllm_sdk.pipelines import blocks, registry
from rcllm_sdk.pipelines import compare as compare_module
from rcllm_sdk.pipelines import run as run_module
from rcllm_sdk.pipelines.compare import decide
from rcllm_sdk.pipelines.pipeline import PipelineConfig, pipeline_lock, run_pipeline
from rcllm_sdk.pipelines.run import data_cutoff, train_from_repo
from rcllm_sdk.pipelines.train import TrainConfig

TRAIN = TrainConfig(recipe="verbalizer", size="micro", steps=8, batch_size=4, vocab_size=600)


def _new_interactions(repo, users: int = 40, per_user: int = 2) -> pl.DataFrame:
    """Unseen items for the first ``users`` users, after everything ingested so far."""
    table = pl.read_parquet(repo / "data" / "interactions.parquet")
    items = sorted(pl.read_parquet(repo / "data" / "items.parquet")["item_id"].to_list())
    start, rows = data_cutoff(repo) + 1, []
    rng = np.random.default_rng(0)
    for n, user in enumerate(sorted(table["user_id"].unique().to_list())[:users]):
        seen = set(table.filter(pl.col("user_id") == user)["item_id"].to_list())
        fresh = [i for i in rng.permutation(items).tolist() if i not in seen][:per_user]
        rows += [(user, item, start + 10 * n + j) for j, item in enumerate(fresh)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


def _stored(store: str, fp: str, keys: list[str]) -> list[bool]:
    with open_store(store, namespace=fp) as target:
        return target.batched_contains([int(k, 16) for k in keys])


def _manifest_keys(repo, store: str, fp: str) -> list[str]:
    return blocks.read_manifest(blocks.manifest_dir(repo, store) / f"{fp}.json")["keys"]


def test_pipeline_trains_promotes_refreshes_follows_and_collects(tmp_path, monkeypatch):
    from conftest import TINY

    repo, name, store = tmp_path / "repo", f"ranker-{uuid.uuid4().hex[:6]}", f"memory://{uuid.uuid4().hex}"
    ingest("synthetic", None, repo, synthetic=TINY)
    first = train_from_repo(repo, config=TRAIN, progress=False, model_name=name)
    assert (repo / "data" / "ranker").resolve() == first["model_dir"].resolve()  # versioned, linked

    def config(**kw):
        return PipelineConfig(
            repo, store=store, model_name=name, train=TRAIN, margin=-1.0, max_users=30, timing_samples=3, **kw
        )

    out = run_pipeline(config())
    assert out["retrain"]["status"].startswith("adopted") and out["promote"]["promoted"]
    v1 = registry.champion(name)
    assert str(v1.version) == first["version"]
    fp1 = fingerprint(first["model_dir"])
    keys1 = _manifest_keys(repo, store, fp1)
    assert keys1 and all(_stored(store, fp1, keys1))

    champion = f"models:/{name}@champion"
    rec = RcRecommender.from_feature_store(repo, model=champion, store=store, guard=False)
    follower = RcRecommender.from_feature_store(
        repo, model=champion, mode="full", follow_alias=True, follow_interval_s=0.05
    )
    assert rec.recommend(1).model_version == str(v1.version)

    again = run_pipeline(config())  # no new data: nothing trained, nothing computed
    assert again["refresh"]["computed"] == 0 and str(registry.champion(name).version) == str(v1.version)
    assert len(MlflowClient().search_model_versions(f"name = '{name}'")) == 1

    append_interactions(repo, _new_interactions(repo))

    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    def v1_serves_with_its_blocks():
        assert str(registry.champion(name).version) == str(v1.version)
        assert not rec.reload() and rec.recommend(1).model_version == str(v1.version)
        assert all(_stored(store, fp1, keys1))

    # A step that fails leaves v1 serving with its blocks; the next run resumes where it stopped.
    for target, attribute, step in (
        (run_module, "train_from_repo", "retrain"),
        (compare_module, "compare", "evaluate"),
        (blocks, "run_refresh", "promote"),  # the challenger's blocks are written before the switch
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, attribute, fail)
            with pytest.raises(PipelineStepError, match=step):
                run_pipeline(config())
        v1_serves_with_its_blocks()

    out = run_pipeline(config(steps=("retrain", "evaluate", "promote")))  # v2 is not trained again
    assert out["retrain"]["status"].startswith("resumed") and out["promote"]["promoted"]
    for attribute, step in (("run_refresh", "refresh"), ("collect_garbage", "gc")):
        with monkeypatch.context() as patch:
            patch.setattr(blocks, attribute, fail)
            with pytest.raises(PipelineStepError, match=step):
                run_pipeline(config(steps=(step,)))
        assert all(_stored(store, fp1, keys1))  # nothing collected until gc succeeds
    out = run_pipeline(config())
    v2 = registry.champion(name)
    assert int(v2.version) == int(v1.version) + 1
    assert int(v2.tags["rcllm.data_cutoff"]) > int(v1.tags["rcllm.data_cutoff"])  # trained on the new data
    evaluation = out["evaluate"]
    assert "diff" in evaluation and evaluation["champion_version"] == str(v1.version)
    assert rec.reload() and rec.recommend(1).model_version == str(v2.version)
    fp2 = fingerprint(v2.tags["rcllm.model_dir"])
    assert all(_stored(store, fp2, _manifest_keys(repo, store, fp2)))
    assert out["gc"]["deleted"] == len(keys1) and not any(_stored(store, fp1, keys1))
    held = {namespace for namespace, _ in _SPACES[store.removeprefix("memory://")]}
    assert fp1 not in held and fp2 in held  # not one block of v1 is left, blocks served on a miss too
    assert (repo / "data" / "ranker").resolve() == (repo / "data" / "models" / "v2").resolve()
    deadline = 200
    while follower.model_version != str(v2.version) and deadline:  # the follower polls every 0.05 s
        deadline -= 1
        follower.follower._stop.wait(0.05)
    assert follower.recommend(1).model_version == str(v2.version)
    follower.close()
    rec.close()

    train_run = MlflowClient().get_run(v2.run_id)
    assert train_run.data.params["steps"] == "8" and "rcllm.data_cutoff" in train_run.data.tags
    assert train_run.data.tags["rcllm.training_data"].startswith("feast")  # point-in-time histories
    assert "mlflow.source.git.commit" in train_run.data.tags or train_run.data.tags.get("rcllm.step")
    assert len(MlflowClient().get_metric_history(v2.run_id, "train_loss")) == 8
    assert train_run.inputs.dataset_inputs  # the training split as a dataset input
    evaluations = mlflow.search_runs(
        experiment_names=["rcllm-pipeline"],
        filter_string=f"tags.rcllm.step = 'evaluate' and tags.rcllm.train_run_id = '{v2.run_id}'",
    )
    assert len(evaluations) == 1
    parent = evaluations["run_id"][0]
    nested = mlflow.search_runs(
        experiment_names=["rcllm-pipeline"], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(nested["tags.rcllm.role"]) == ["challenger", "champion"]
    train = v2.run_id
    modes = mlflow.search_runs(
        experiment_names=["rcllm-evaluate"],
        filter_string=f"tags.rcllm.model_version = '{v2.version}' and tags.rcllm.train_run_id = '{train}'",
    )
    parent = modes[modes["tags.mlflow.parentRunId"].isna()]
    assert len(parent) == 1 and parent["tags.rcllm.pipeline_run"].iloc[0]  # the pipeline's evaluate
    children = modes[modes["tags.mlflow.parentRunId"] == parent["run_id"].iloc[0]]
    assert {"full", "prefix", "rcllm", "control:wrong_history"} <= set(children["tags.mlflow.runName"])
    figures = {a.path for a in MlflowClient().list_artifacts(parent["run_id"].iloc[0], "figures")}
    assert "figures/ttft_cdf.png" in figures
    assert MlflowClient().get_registered_model(name).aliases == {"champion": v2.version}


def test_promotion_needs_the_margin():
    evaluation = {"diff": {"mean": 0.01, "ci": [-0.02, 0.04]}}
    assert decide(evaluation, 0.0)[0]
    promoted, reason = decide(evaluation, 0.02)
    assert not promoted and "champion stays" in reason
    assert decide({"challenger": {"ndcg@10": 0.1}}, 0.5) == (
        True,
        "no champion yet: the first model becomes champion",
    )


def test_two_runs_never_overlap(tmp_path):
    with pipeline_lock(tmp_path), pytest.raises(PipelineBusyError):
        run_pipeline(PipelineConfig(tmp_path, steps=("gc",)))


def test_evaluate_logs_a_parent_run_with_nested_modes_and_figures(tmp_path):
    from rcllm_sdk.evaluation.mlflow_log import log_evaluation

    timed = {"ttft_ms_p50": 5.0, "ndcg@10": 0.3}
    results = {
        "retriever": {"ndcg@10": 0.2},
        "full": {**timed, "ttft_ms_p50": 9.0},
        "rcllm": {**timed, "recompute_fraction": 0.2, "top1_agreement_with_full": 1.0},
        "rcllm:none": {
            **timed,
            "ttft_ms_p50": 4.0,
            "recompute_fraction": 0.05,
            "top1_agreement_with_full": 0.9,
        },
    }
    report = {
        "dataset": "fixture",
        "users": 2,
        "results": results,
        "config": {
            "model": str(tmp_path / "not-registered"),
            "candidates": 20,
            "policy": "block_head:2",
            "store": "local://",
            "timing": {"samples": 2},
        },
    }
    ranks = {"full": np.array([0, 3]), "retriever": np.array([1, -1])}
    samples = {"full": [9.0, 10.0], "rcllm": [5.0, 6.0]}
    parent = log_evaluation(report, ranks, [1, 2], {1: 5, 2: 6}, samples, tmp_path)
    run = MlflowClient().get_run(parent)
    assert {"rcllm.model_version", "rcllm.train_run_id"} <= set(run.data.tags)
    assert run.data.metrics["full.ndcg_at_10"] == 0.3
    pngs = {a.path for a in MlflowClient().list_artifacts(parent, "figures")}
    assert pngs == {
        "figures/ttft_cdf.png",
        "figures/accuracy_vs_ttft.png",
        "figures/recompute_vs_agreement.png",
    }
    nested = mlflow.search_runs(
        experiment_names=["rcllm-evaluate"], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(nested["tags.mlflow.runName"]) == sorted(results)
    assert set(nested["params.policy"]) >= {"none", "block_head:2"}


def test_append_adds_interactions_and_keeps_models_and_pipeline_files(tmp_path):
    from conftest import TINY
    from rcllm_sdk.errors import DataFormatError
    from rcllm_sdk.features import FeatureClient

    repo = tmp_path / "repo"
    ingest("synthetic", None, repo, synthetic=TINY)
    kept = [repo / "data" / "models" / "v1" / "config.json", repo / "data" / "pipeline" / "state.json"]
    for path in kept:
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    before, cutoff = pl.read_parquet(repo / "data" / "interactions.parquet"), data_cutoff(repo)
    new = _new_interactions(repo, users=3, per_user=1)
    result = append_interactions(repo, new)
    after = pl.read_parquet(repo / "data" / "interactions.parquet")
    assert result.interactions == after.height == before.height + 3 and data_cutoff(repo) > cutoff
    user, item = new.row(0)[:2]
    mine = after.filter(pl.col("user_id") == user).sort("position")
    assert mine["item_id"][-1] == item and mine["split"][-1] == "test"  # the newest item is the new truth
    history = FeatureClient(repo).histories([user])[0][0]
    assert item not in history and history[-1] == mine["item_id"][-2]  # the old test item is history now
    assert all(path.read_text() == "{}" for path in kept)
    unknown = pl.DataFrame({"user_id": [user], "item_id": [10**6], "timestamp": [cutoff + 99]})
    with pytest.raises(DataFormatError, match="missing from items"):
        append_interactions(repo, unknown)
    assert pl.read_parquet(repo / "data" / "interactions.parquet").height == after.height


def test_point_in_time_histories_never_see_the_future(tmp_path):
    from rcllm_sdk.data.split import leave_one_out
    from rcllm_sdk.pipelines.point_in_time import histories_before, offline_store
    from rcllm_sdk.pipelines.run import training_histories_as_of

    # user 1: A@100, B@200, C@200 (a tie), D@300 (validation), E@400 (test); user 2: F@150, G@250, H@350
    rows = [
        (1, 1, 100),
        (1, 2, 200),
        (1, 3, 200),
        (1, 4, 300),
        (1, 5, 400),
        (2, 6, 150),
        (2, 7, 250),
        (2, 8, 350),
    ]
    interactions = leave_one_out(pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row"))
    shuffled = interactions.sample(fraction=1.0, shuffle=True, seed=1)  # row order must not matter
    store = offline_store(tmp_path, shuffled)
    got = histories_before(store, [1, 1, 1, 1, 1, 2, 3], [100, 200, 201, 300, 10**9, 250, 500])
    assert got == [[], [1], [1, 2, 3], [1, 2, 3], [1, 2, 3, 4, 5], [6], []]
    train = training_histories_as_of(tmp_path, shuffled).sort("user_id")
    assert train["item_ids"].to_list() == [[1, 2, 3], [6]]  # as of each user's validation item

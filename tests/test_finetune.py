"""``rcllm train --base-model``: a tiny random Qwen2 fine-tuned with LoRA, fully (block-aware), or
merged; every output serves in every mode (``policy="full"`` equal to ``mode="full"``) and ``rcllm
evaluate --model`` runs on it; a YAML template with checkpointing and accumulation; a SentencePiece
Llama without a pad token; bad settings are named errors; a crashed run resumes where it stopped."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from rcllm_sdk import RcRecommender
from rcllm_sdk.cli import main
from rcllm_sdk.errors import ConfigError
from rcllm_sdk.pipelines.train_config import TrainConfig
from tests.tiny_checkpoints import default_texts, make_checkpoint

LORA_RUN = ["--lora", "8,16,0.05", "--steps", "30", "--lr", "1e-2", "--batch-size", "8"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box: one torch thread is ~10x faster than two under load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model(ingested_repo, tmp_path_factory):
    """A tiny random Qwen2 (hidden 64, 2 layers) with a byte-level BPE tokenizer trained on the
    catalog's titles and the template's texts."""
    items = pl.read_parquet(ingested_repo / "data" / "items.parquet")
    folder = tmp_path_factory.mktemp("base") / "qwen2"
    return make_checkpoint(folder, "qwen2", "bpe", texts=default_texts(items))


def _train(repo, base, out, *flags) -> dict:
    assert main(["train", "--repo", str(repo), "--base-model", str(base), "--out", str(out), *flags]) == 0
    return json.loads((out / "rcllm_training.json").read_text())


@pytest.fixture(scope="module")
def lora_model(ingested_repo, base_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "ranker"
    return out, _train(ingested_repo, base_model, out, *LORA_RUN)


def _frozen_losses(repo, base_model, tmp_path, **settings) -> list[float]:
    """The losses of the same run with a negligible learning rate. Each step's batch and dropout are
    seeded by the step, so these are what the batches alone give (they fall too, by chance): a
    trained run must end below them."""
    from rcllm_sdk.pipelines.run import train_from_repo

    config = TrainConfig.resolve(base_model=str(base_model), lr=1e-12, **settings)
    run = train_from_repo(repo, tmp_path / "frozen", config, progress=False, log_mlflow=False)
    return run["summary"]["step_losses"]


def _users(repo, n=6):
    return pl.read_parquet(repo / "data" / "user_history.parquet")["user_id"].sort().to_list()[:n]


def _full_scores(repo, model, users):
    with RcRecommender.from_feature_store(repo, model=model, mode="full") as rec:
        return rec.recommend_batch(users, k=10)


def _serves_every_mode_as_full(repo, model) -> list:
    """``prefix`` and ``rcllm`` with ``policy="full"``, cold and warm, rank as ``mode="full"``
    (max abs score difference < 1e-4); the default policy serves too. Returns full's results."""
    users = _users(repo)
    full = _full_scores(repo, model, users)
    for mode, policy in (("prefix", None), ("rcllm", "full"), ("rcllm", None)):
        with RcRecommender.from_feature_store(
            repo, model=model, mode=mode, policy=policy, store="memory://", guard=False
        ) as rec:
            cold, warm = rec.recommend_batch(users, k=10), rec.recommend_batch(users, k=10)
        assert all(r.mode == mode for r in cold + warm)
        assert sum(r.cache.hits for r in warm) > 0
        if policy is None and mode == "rcllm":
            continue  # block_head:2 approximates full; only that it serves is checked here
        for f, c, w in zip(full, cold, warm, strict=True):
            assert c.item_ids == f.item_ids and w.item_ids == f.item_ids
            assert np.abs(np.array(c.scores) - f.scores).max() < 1e-4
            assert np.abs(np.array(w.scores) - f.scores).max() < 1e-4
    return full


def _evaluates_every_mode(repo, model, tmp_path) -> None:
    ingested = {p: p.stat().st_mtime_ns for p in (repo / "data").glob("*.parquet")}
    out = tmp_path / "report.json"
    flags = ["--max-users", "8", "--timing-samples", "3", "--out", str(out)]
    assert main(["evaluate", "--repo", str(repo), "--model", str(model), *flags]) == 0
    assert {p: p.stat().st_mtime_ns for p in (repo / "data").glob("*.parquet")} == ingested
    results = json.loads(out.read_text())["results"]
    assert {"full", "prefix", "rcllm", "retriever"} <= set(results)
    assert results["prefix"]["top1_agreement_with_full"] == 1.0


def test_lora_lowers_the_loss_and_writes_an_adapter_folder(lora_model, base_model, ingested_repo, tmp_path):
    out, record = lora_model
    losses = record["step_losses"]
    assert len(losses) == 30 and np.mean(losses[-5:]) < np.mean(losses[:5])
    frozen = _frozen_losses(ingested_repo, base_model, tmp_path, steps=30, batch_size=8)
    assert np.mean(losses[-5:]) < np.mean(frozen[-5:])
    assert (record["recipe"], record["lora"], record["output"]) == ("finetune", "8,16,0.05", "adapter")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_model.resolve())
    assert not (out / "config.json").exists() and not (out / "checkpoint").exists()
    assert 0 < record["trainable_parameters"] < record["parameters"]


def test_the_adapter_serves_every_mode_and_changes_the_base(lora_model, base_model, ingested_repo):
    out, _ = lora_model
    tuned = _serves_every_mode_as_full(ingested_repo, out)
    before = _full_scores(ingested_repo, base_model, _users(ingested_repo))
    moved = max(np.abs(np.array(t.scores) - b.scores).max() for t, b in zip(tuned, before, strict=True))
    assert moved > 1e-3  # the adapter is applied, not the bare base


def test_evaluate_runs_every_mode_on_the_adapter(lora_model, ingested_repo, tmp_path):
    _evaluates_every_mode(ingested_repo, lora_model[0], tmp_path)


def test_merge_writes_a_plain_folder_ranking_as_the_adapter(lora_model, base_model, ingested_repo, tmp_path):
    out = tmp_path / "merged"
    record = _train(ingested_repo, base_model, out, *LORA_RUN, "--merge")
    assert record["output"] == "merged" and record["step_losses"] == lora_model[1]["step_losses"]
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    merged = _serves_every_mode_as_full(ingested_repo, out)
    adapter = _full_scores(ingested_repo, lora_model[0], _users(ingested_repo))
    for m, a in zip(merged, adapter, strict=True):
        assert m.item_ids == a.item_ids and np.abs(np.array(m.scores) - a.scores).max() < 1e-4
    _evaluates_every_mode(ingested_repo, out, tmp_path)


def test_full_block_aware_fine_tuning_trains_every_weight_and_serves(base_model, ingested_repo, tmp_path):
    out = tmp_path / "full"
    flags = ["--full", "--steps", "12", "--lr", "1e-3", "--batch-size", "8", "--block-aware"]
    record = _train(ingested_repo, base_model, out, *flags, "--block-aware-fraction", "0.5")
    assert record["output"] == "full" and record["lora"] is None and record["block_aware"]
    assert record["trainable_parameters"] == record["parameters"]
    losses = record["step_losses"]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    frozen = _frozen_losses(
        ingested_repo,
        base_model,
        tmp_path,
        full=True,
        steps=12,
        batch_size=8,
        block_aware=True,
        block_aware_fraction=0.5,
    )
    assert np.mean(losses[-5:]) < np.mean(frozen[-5:])
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    _serves_every_mode_as_full(ingested_repo, out)
    _evaluates_every_mode(ingested_repo, out, tmp_path)


def test_yaml_template_checkpointing_and_accumulation_train_and_serve(base_model, ingested_repo, tmp_path):
    template = tmp_path / "template.yaml"
    template.write_text(
        "item_fields:\n  - {name: title, max_words: 6}\n  - {name: category, max_words: 2}\n"
        'label_format: "({label}) "\nhistory_length: 5\n'
    )
    out = tmp_path / "templated"
    flags = ["--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--gradient-checkpointing"]
    record = _train(ingested_repo, base_model, out, "--template", str(template), *flags)
    assert len(record["step_losses"]) == 3 and record["gradient_checkpointing"]
    saved = json.loads((out / "rcllm_template.json").read_text())
    assert (saved["label_format"], saved["max_history"], len(saved["item_fields"])) == ("({label}) ", 5, 2)
    _serves_every_mode_as_full(ingested_repo, out)


def test_a_sentencepiece_llama_without_pad_token_fine_tunes_and_serves(ingested_repo, tmp_path):
    items = pl.read_parquet(ingested_repo / "data" / "items.parquet")
    base = make_checkpoint(
        tmp_path / "llama", "llama", "sentencepiece", pad_token=False, texts=default_texts(items)
    )
    out = tmp_path / "llama-lora"
    record = _train(ingested_repo, base, out, "--steps", "3", "--batch-size", "2", "--merge")
    assert len(record["step_losses"]) == 3 and all(np.isfinite(record["step_losses"]))
    _serves_every_mode_as_full(ingested_repo, out)


def test_bad_finetune_settings_are_named_errors(base_model, ingested_repo, tmp_path, capsys):
    out = tmp_path / "never"
    for flags, message in (
        (["--lora", "8,16"], "lora must be rank,alpha,dropout"),
        (["--lora", "eight,16,0.05"], "lora must be rank,alpha,dropout"),
        (["--full", "--merge"], "full trains every weight"),
        (["--dtype", "bfloat16", "--device", "cpu"], "CPU runs in float32"),
    ):
        args = ["train", "--repo", str(ingested_repo), "--base-model", str(base_model), "--out", str(out)]
        assert main([*args, *flags]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="settings of the finetune recipe"):
        TrainConfig.resolve(lora="8,16,0.05")  # no base model: not the finetune recipe
    assert TrainConfig.resolve(base_model=str(base_model)).recipe == "finetune"
    assert not out.exists()


def test_a_crashed_run_resumes_from_its_checkpoint_and_continues_the_same(
    base_model, ingested_repo, tmp_path, monkeypatch
):
    from rcllm_sdk.pipelines.finetune import loop
    from rcllm_sdk.pipelines.run import train_from_repo

    def run(out, **settings):
        config = TrainConfig.resolve(
            base_model=str(base_model), steps=8, batch_size=4, lr=1e-2, checkpoint_every=3, **settings
        )
        return train_from_repo(ingested_repo, out, config, progress=False, log_mlflow=False)["summary"]

    straight = run(tmp_path / "straight")["step_losses"]
    real_step, calls = loop._step, []

    def crash_at_step_seven(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "_step", crash_at_step_seven)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed")
    assert (tmp_path / "crashed" / "checkpoint").is_dir()  # written after step 6
    monkeypatch.setattr(loop, "_step", real_step)
    resumed = run(tmp_path / "crashed", resume=True)["step_losses"]
    assert len(resumed) == 8
    np.testing.assert_allclose(resumed, straight, rtol=1e-5)
    assert not (tmp_path / "crashed" / "checkpoint").exists()


def test_an_adapter_of_a_registry_alias_stays_on_the_base_version_it_was_trained_on(
    base_model, ingested_repo, tmp_path
):
    """Fine-tuned from ``models:/name@alias``, the adapter names the version the alias pointed at;
    moving the alias afterwards does not move the adapter to the new base."""
    import shutil
    import uuid

    import mlflow
    from mlflow import MlflowClient

    from rcllm_sdk.model.ranker import fingerprint, load_ranker
    from rcllm_sdk.model.sources import resolve_source
    from rcllm_sdk.pipelines.run import train_from_repo

    items = pl.read_parquet(ingested_repo / "data" / "items.parquet")
    other = make_checkpoint(tmp_path / "v2", "qwen2", "bpe", texts=default_texts(items), seed=1)
    client, name = MlflowClient(), f"base-{uuid.uuid4().hex[:6]}"
    client.create_registered_model(name)
    for folder in (base_model, other):
        with mlflow.start_run() as run:
            mlflow.log_artifacts(str(folder), artifact_path="model")
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, "base", "1")

    out = tmp_path / "adapter"
    config = TrainConfig.resolve(base_model=f"models:/{name}@base", lora="8,16,0.05", steps=2, batch_size=4)
    train_from_repo(ingested_repo, out, config, progress=False, log_mlflow=False)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == f"models:/{name}/1"

    client.set_registered_model_alias(name, "base", "2")  # the alias moves on after training

    def on_base(folder, base):
        copy = tmp_path / f"on-{folder.name}"
        shutil.copytree(out, copy)
        pointed = {**adapter_config, "base_model_name_or_path": base}
        (copy / "adapter_config.json").write_text(json.dumps(pointed))
        return copy

    assert fingerprint(resolve_source(out).base) == fingerprint(base_model)
    assert load_ranker(out).weights[0].digest == load_ranker(base_model).weights[0].digest
    users = _users(ingested_repo)
    served = _full_scores(ingested_repo, out, users)
    explicit = _full_scores(ingested_repo, on_base(base_model, str(base_model.resolve())), users)
    moved = _full_scores(ingested_repo, on_base(other, str(other.resolve())), users)
    for s, e in zip(served, explicit, strict=True):
        assert s.item_ids == e.item_ids and np.abs(np.array(s.scores) - e.scores).max() < 1e-5
    assert max(np.abs(np.array(s.scores) - m.scores).max() for s, m in zip(served, moved, strict=True)) > 1e-3

import numpy as np
import pytest

from rcllm_sdk.config import RecommenderConfig
from rcllm_sdk.errors import ConfigError
from rcllm_sdk.retrieval import Retriever, RetrieverConfig

SEQUENCES = [[1, 2, 3], [1, 2, 4], [2, 3, 5], [5, 6]]


def make(**cfg):
    emb = np.eye(6, 4, dtype=np.float32)
    return Retriever.fit(SEQUENCES, [1, 2, 3, 4, 5, 6], emb, RetrieverConfig(**cfg))


def test_transitions_rank_followers_first_and_exclude_seen():
    r = make(w_similarity=0.0, w_popularity=0.0, recent=1, horizon=1)
    # after item 2: 3 follows twice, 4 once; seen items never come back
    assert r.candidates([1, 2], k=2) == [3, 4]
    assert 1 not in r.candidates([1, 2], k=4) and 2 not in r.candidates([1, 2], k=4)


def test_candidates_are_capped_by_the_catalog_and_deterministic():
    r = make()
    assert len(r.candidates([1, 2, 3, 4], k=10)) == 2
    assert r.candidates([1], k=5) == r.candidates([1], k=5)


def test_popular_is_the_cold_start_order():
    assert make().popular(2) == [2, 1]  # item 2 occurs 3 times, then 1/3/5 twice (lowest id first)


def test_save_load_round_trip(tmp_path):
    r = make(decay=0.5)
    r.save(tmp_path / "r.npz")
    back = Retriever.load(tmp_path / "r.npz")
    assert back.config == r.config
    assert np.allclose(back.scores([1, 2]), r.scores([1, 2]))


def test_config_precedence(tmp_path, monkeypatch):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("candidates: 30\nbatch_size: 4\ncold_start: popular\n")
    monkeypatch.setenv("RCLLM_BATCH_SIZE", "8")
    cfg = RecommenderConfig.resolve(yaml_file, cold_start="raise")
    assert (cfg.candidates, cfg.batch_size, cfg.cold_start) == (30, 8, "raise")  # yaml < env < kwargs


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown config"):
        RecommenderConfig.resolve(candidats=3)
    with pytest.raises(ConfigError, match="cold_start"):
        RecommenderConfig(cold_start="guess")
    with pytest.raises(ConfigError, match="not a valid int"):
        RecommenderConfig.resolve(candidates="many")


def test_cli_retriever_settings_override_the_defaults_and_reject_unknown_names():
    from rcllm_sdk.cli import build_parser

    parse = lambda *argv: build_parser().parse_args(["ingest", "--repo", "r", *argv])  # noqa: E731
    assert parse().retriever == RetrieverConfig()
    chosen = parse("--retriever", "decay=0.45, w_similarity=0.1,recent=3").retriever
    assert chosen == RetrieverConfig(decay=0.45, w_similarity=0.1, recent=3)
    assert isinstance(chosen.recent, int)
    for bad in ("decay=fast", "speed=2"):
        with pytest.raises(SystemExit):
            parse("--retriever", bad)


def test_ingest_records_the_retriever_settings_it_was_given(tmp_path):
    from rcllm_sdk.data.synthetic import SyntheticConfig
    from rcllm_sdk.ingest import ingest, read_manifest

    config = RetrieverConfig(decay=0.45, w_similarity=0.1)
    ingest(
        "synthetic",
        None,
        tmp_path,
        synthetic=SyntheticConfig(n_users=30, n_items=60, n_categories=3, seed=1),
        retriever_config=config,
    )
    assert RetrieverConfig(**read_manifest(tmp_path)["retriever"]) == config
    assert Retriever.load(tmp_path / "data" / "retriever.npz").config == config

"""A failed ingest leaves the previous repo serving: bad input is refused before anything is written."""

import hashlib
from pathlib import Path

import pytest

from rcllm_sdk.cache.local_servers import free_port
from rcllm_sdk.errors import DataFormatError, FeatureRepoError
from rcllm_sdk.ingest import ingest


def _snapshot(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(repo.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def small_repo(tmp_path):
    from conftest import TINY

    repo = tmp_path / "repo"
    ingest("synthetic", None, repo, synthetic=TINY)
    return repo


def _csv_folder(tmp_path: Path, interactions: str, items: str) -> Path:
    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "interactions.csv").write_text(interactions)
    (folder / "items.csv").write_text(items)
    return folder


@pytest.mark.parametrize(
    ("interactions", "items", "message"),
    [
        ("user_id,item_id,timestamp\n", "item_id,title,category\n1,a,x\n", "no interactions"),
        ("user_id,item_id,timestamp\n1,1,5\n", "item_id,title,category\n", "no items"),
        ("", "item_id,title,category\n1,a,x\n", "is empty"),
        ("user_id,item_id,timestamp\n1,1,5\n", "", "is empty"),
    ],
)
def test_empty_or_header_only_files_are_refused_and_the_repo_is_untouched(
    small_repo, tmp_path, interactions, items, message
):
    before = _snapshot(small_repo)
    with pytest.raises(DataFormatError, match=message):
        ingest("csv", _csv_folder(tmp_path, interactions, items), small_repo)
    assert _snapshot(small_repo) == before


def test_an_unreachable_online_store_is_refused_before_the_repo_is_touched(small_repo):
    from conftest import TINY

    before = _snapshot(small_repo)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}"
    with pytest.raises(FeatureRepoError, match="did not answer") as error:
        ingest("synthetic", None, small_repo, online_store=url, synthetic=TINY)
    assert "hunter2" not in str(error.value)
    assert _snapshot(small_repo) == before


def test_the_repo_still_serves_what_it_served_after_a_refused_ingest(trained_repo, tmp_path):
    from rcllm_sdk import RcRecommender

    repo, _ = trained_repo
    with RcRecommender.from_feature_store(repo, mode="full") as rec:
        before = rec.recommend(1, k=5).item_ids
        with pytest.raises(DataFormatError):
            ingest(
                "csv", _csv_folder(tmp_path, "user_id,item_id,timestamp\n", "item_id,title,category\n"), repo
            )
        assert rec.recommend(1, k=5).item_ids == before
    with RcRecommender.from_feature_store(repo, mode="full") as reopened:
        assert reopened.recommend(1, k=5).item_ids == before

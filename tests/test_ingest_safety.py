"""A failed ingest leaves the previous repo serving: bad input is refused before anything is written."""

import hashlib
from dataclasses import replace
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


# Every step after the checks, failing: the repo must stay byte-identical and leave no staging folder.
FAULTS = {  # step: (module, attribute path, failing call: None = every call, -1 = the commit's last)
    "interactions parquet": ("polars", "DataFrame.write_parquet", None),
    "retriever": ("rcllm_sdk.retrieval", "Retriever.save", None),
    "feast apply": ("feast", "FeatureStore.apply", None),
    "feast materialize": ("feast", "FeatureStore.materialize", None),
    "manifest": ("rcllm_sdk.ingest", "_write_manifest", None),
    "first rename of the commit": ("os", "replace", 1),
    "a middle rename of the commit": ("os", "replace", 6),
    "the feature_store.yaml rename": ("os", "replace", -1),
}


def _failing_on_call(original, call: int | None, calls: list):
    def failing(*args, **kwargs):
        calls.append(args)
        if call is None or len(calls) == call:
            raise OSError(28, "No space left on device (injected)")
        return original(*args, **kwargs)

    return failing


def _renames_of_a_commit(small_repo) -> int:
    """How many os.replace calls a successful re-ingest makes (the yaml's is the last)."""
    import os

    from conftest import TINY

    calls = []
    original = os.replace
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("os.replace", lambda *a, **k: calls.append(a) or original(*a, **k))
        ingest("synthetic", None, small_repo, synthetic=TINY)
    assert Path(calls[-1][1]).name == "feature_store.yaml"
    return len(calls)


@pytest.mark.parametrize("step", FAULTS)
def test_a_failure_at_any_step_leaves_the_previous_repo_byte_for_byte(small_repo, monkeypatch, step):
    import importlib

    from conftest import TINY

    module, path, call = FAULTS[step]
    if call == -1:
        call = _renames_of_a_commit(small_repo)
    before = _snapshot(small_repo)
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    monkeypatch.setattr(owner, name, _failing_on_call(getattr(owner, name), call, []))
    with pytest.raises(OSError, match="injected"):
        ingest("synthetic", None, small_repo, synthetic=replace(TINY, seed=TINY.seed + 1))
    monkeypatch.undo()
    assert _snapshot(small_repo) == before
    assert not (small_repo / ".ingest-staging").exists() and not (small_repo / ".ingest-previous").exists()


def test_a_re_ingest_replaces_the_repo_and_serves_the_new_data(small_repo):
    from conftest import TINY
    from rcllm_sdk.features import FeatureClient

    bigger = replace(TINY, n_users=TINY.n_users + 7)
    result = ingest("synthetic", None, small_repo, synthetic=bigger)
    assert result.users == bigger.n_users
    assert FeatureClient(small_repo).histories([bigger.n_users])[0] is not None  # a new user is served
    assert sorted(p.name for p in small_repo.iterdir() if p.name.startswith(".ingest")) == []


def test_a_redis_online_store_keeps_its_password_off_disk_and_switches_namespace(tmp_path, monkeypatch):
    from conftest import TINY
    from rcllm_sdk.cache.local_servers import start_redis
    from rcllm_sdk.features import FeatureClient
    from rcllm_sdk.features.snapshot import project_of
    from rcllm_sdk.features.store import PASSWORD_ENV

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    server = start_redis(password="s3cr3t-pw")
    try:
        url = f"redis://:s3cr3t-pw@127.0.0.1:{server.port}"
        repo = tmp_path / "repo"
        ingest("synthetic", None, repo, online_store=url, synthetic=TINY)
        assert all(b"s3cr3t-pw" not in p.read_bytes() for p in repo.rglob("*") if p.is_file())
        first = project_of(repo / "feature_store.yaml")
        served = FeatureClient(repo).histories([1])[0]
        assert served is not None
        monkeypatch.delenv(PASSWORD_ENV)
        with pytest.raises(FeatureRepoError, match=PASSWORD_ENV):
            FeatureClient(repo)
        monkeypatch.setenv(PASSWORD_ENV, "s3cr3t-pw")
        ingest("synthetic", None, repo, online_store=url, synthetic=TINY)
        assert project_of(repo / "feature_store.yaml") != first
        assert FeatureClient(repo).histories([1])[0] == served
        import redis

        keys = redis.Redis(port=server.port, password="s3cr3t-pw").keys(f"*{first}".encode())
        assert keys == []  # the replaced ingest's namespace was torn down
    finally:
        server.stop()


def test_a_failed_append_leaves_the_repo_byte_for_byte(small_repo, tmp_path, monkeypatch):
    import feast

    from rcllm_sdk.ingest_append import append_source

    before = _snapshot(small_repo)
    folder = _csv_folder(
        tmp_path, "user_id,item_id,timestamp\n1,2,999999\n", "item_id,title,category\n2,b,y\n"
    )
    monkeypatch.setattr(feast.FeatureStore, "materialize", _failing_on_call(None, None, []))
    with pytest.raises(OSError, match="injected"):
        append_source(small_repo, "csv", folder)
    assert _snapshot(small_repo) == before

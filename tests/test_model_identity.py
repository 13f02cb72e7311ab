"""Model identity: the fingerprint is a full content hash of the weights actually served."""

import os

import pytest
import torch
from safetensors.torch import save_file

from rcllm_sdk.errors import ModelLoadError
from rcllm_sdk.model import weights
from rcllm_sdk.model.weights import digest_of, read_weights


def _weights_folder(tmp_path, rows: int = 4096):
    folder = tmp_path / "m"
    folder.mkdir()
    save_file(
        {"w": torch.arange(rows * 256, dtype=torch.float32).reshape(rows, 256)}, folder / "model.safetensors"
    )
    return folder


def _flip_byte(path, offset: int) -> None:
    with path.open("r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_a_change_anywhere_in_a_weight_file_changes_the_digest(tmp_path):
    folder = _weights_folder(tmp_path)  # 4 MiB of tensor data
    file = folder / "model.safetensors"
    before = digest_of([file])
    _flip_byte(file, file.stat().st_size - 12345)  # far from the start, between any samples
    os.utime(file, ns=(file.stat().st_atime_ns, file.stat().st_mtime_ns + 1))
    assert digest_of([file]) != before


def test_loaded_tensors_are_owned_not_mapped_and_a_later_change_is_reported(tmp_path):
    folder = _weights_folder(tmp_path)
    loaded = read_weights(folder)
    kept = loaded.tensors["w"].clone()
    file = folder / "model.safetensors"
    _flip_byte(file, file.stat().st_size - 100)
    assert torch.equal(loaded.tensors["w"], kept)
    assert loaded.changed_files() == [file]


def test_a_file_rewritten_while_it_is_read_is_read_again(tmp_path, monkeypatch):
    import safetensors

    folder = _weights_folder(tmp_path, rows=64)
    real_open, opened = safetensors.safe_open, []

    def rewritten_during_the_first_copy(path, **kwargs):
        handle = real_open(path, **kwargs)
        opened.append(path)
        if len(opened) == 1:  # another writer replaces the file while it is being copied
            save_file({"w": torch.ones(64, 256)}, path)
        return handle

    monkeypatch.setattr(safetensors, "safe_open", rewritten_during_the_first_copy)
    loaded = read_weights(folder)
    assert len(opened) == 2
    assert torch.equal(loaded.tensors["w"], torch.ones(64, 256))  # the complete new file, not a mix
    assert loaded.digest == digest_of([folder / "model.safetensors"])  # and the digest is the new file's


def test_a_file_that_keeps_changing_is_a_named_error(tmp_path, monkeypatch):
    folder = _weights_folder(tmp_path, rows=64)
    real = weights.file_digest

    def always_rewritten(path):
        digest = real(path)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
        return digest

    monkeypatch.setattr(weights, "file_digest", always_rewritten)
    with pytest.raises(ModelLoadError, match="changed while it was being read"):
        read_weights(folder)


def test_truncated_and_pickle_weights_are_named_errors(tmp_path):
    folder = _weights_folder(tmp_path, rows=64)
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        read_weights(folder)
    file.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelLoadError, match="pickle"):
        read_weights(folder)


# -- the same guarantees through load_ranker ---------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny checkpoint re-saved by the SDK (so it carries the weights record)."""
    from rcllm_sdk.model.ranker import load_ranker, save_ranker
    from tests.tiny_checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("identity")
    ranker = load_ranker(make_checkpoint(root / "raw", "qwen2"))
    return save_ranker(ranker, root / "saved")


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def _probe(ranker) -> torch.Tensor:
    with torch.no_grad():
        return ranker.model(torch.tensor([[1, 2, 3, 4]])).logits


def test_flipped_bytes_in_sdk_saved_weights_are_refused(saved, tmp_path):
    from rcllm_sdk.model.ranker import load_ranker

    folder = _copy(saved, tmp_path)
    _flip_byte(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 64)
    with pytest.raises(ModelLoadError, match="differ from those saved"):
        load_ranker(folder)


def test_a_config_edited_to_another_layer_count_is_refused(saved, tmp_path):
    import json

    from rcllm_sdk.model.ranker import load_ranker

    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="config.json"):  # refused by the config's own check
        load_ranker(folder)
    config.pop("layer_types", None)  # an edit consistent within the config: refused by the weights
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not match its weights"):
        load_ranker(folder)


@pytest.mark.parametrize("name", ["rcllm_template.json", "model.safetensors", "tokenizer_config.json"])
def test_a_truncated_model_file_is_a_model_load_error_naming_it(saved, tmp_path, name):
    from rcllm_sdk.model.ranker import load_ranker

    folder = _copy(saved, tmp_path)
    data = (folder / name).read_bytes()
    (folder / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=name.replace(".", r"\.")):
        load_ranker(folder)


def test_a_served_model_keeps_its_weights_and_fingerprint_when_the_folder_changes(saved, tmp_path):
    from rcllm_sdk.model.ranker import fingerprint, load_ranker
    from tests.tiny_checkpoints import make_checkpoint

    folder = _copy(saved, tmp_path)
    ranker = load_ranker(folder)
    before, loaded_fingerprint = _probe(ranker), ranker.fingerprint
    retrained = make_checkpoint(tmp_path / "retrained", "qwen2", seed=7)
    with (folder / "model.safetensors").open("r+b") as fh:  # copied over in place, as `cp` does
        fh.write((retrained / "model.safetensors").read_bytes())
    assert torch.equal(_probe(ranker), before) and ranker.fingerprint == loaded_fingerprint
    assert ranker.changed_files() == [folder / "model.safetensors"]
    assert fingerprint(folder) != loaded_fingerprint  # a reload would get new block keys


def test_a_load_racing_a_retrain_names_the_weights_it_loaded(saved, tmp_path, monkeypatch):
    """The retrain replaces the file after its bytes were read: the ranker must carry the
    fingerprint of what it loaded, never the new file's."""
    from rcllm_sdk.model import sources
    from rcllm_sdk.model.ranker import fingerprint, load_ranker
    from tests.tiny_checkpoints import make_checkpoint

    folder = _copy(saved, tmp_path)
    original = fingerprint(folder)
    retrained = make_checkpoint(tmp_path / "retrained", "qwen2", seed=7)
    real = sources.read_weights

    def read_then_retrain(path):
        loaded = real(path)
        os.replace(retrained / "model.safetensors", path / "model.safetensors")
        return loaded

    monkeypatch.setattr(sources, "read_weights", read_then_retrain)
    monkeypatch.setattr("rcllm_sdk.model.ranker._check_saved_digest", lambda *a: None)
    ranker = load_ranker(folder)
    assert ranker.fingerprint == original != fingerprint(folder)


def test_a_recommender_says_once_that_its_model_folder_changed(trained_repo, tmp_path, caplog):
    import logging
    import shutil

    from rcllm_sdk import RcRecommender

    repo, trained = trained_repo
    folder = shutil.copytree(trained["model_dir"], tmp_path / "served")
    with RcRecommender.from_feature_store(repo, model=folder, mode="full") as rec:
        rec.weights_watch.every_s = 0.0
        before = rec.recommend(1, k=5)
        _flip_byte(folder / "model.safetensors", (folder / "model.safetensors").stat().st_size - 64)
        with caplog.at_level(logging.WARNING, logger="rcllm_sdk.model"):
            after = [rec.recommend(1, k=5) for _ in range(3)]
        warnings = [r for r in caplog.records if "changed on disk" in r.getMessage()]
        assert len(warnings) == 1 and "until reload()" in warnings[0].getMessage()
        assert all(a.item_ids == before.item_ids and a.scores == before.scores for a in after)
        assert all(a.model_version == before.model_version for a in after)

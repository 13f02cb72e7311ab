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

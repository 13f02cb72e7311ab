"""A model folder's weights, read so that the fingerprint names exactly the weights served.

Every safetensors file is hashed whole (streamed; the digest is cached by path, size, mtime
and inode, so an unchanged multi-GB file is hashed once per process), then its tensors are
copied into memory the process owns (never memory-mapped: a file copied over the folder later
cannot change a running model), then the file's stat is checked again. A file that changed
while it was read is read again once; a second change is a :class:`ModelLoadError`. Weights in
pickle files (``*.bin``) are refused: the SDK loads no pickle.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
HASH_CHUNK = 8 << 20


@dataclass(slots=True, frozen=True)
class FileStamp:
    """What identifies a file's content without reading it: path, size, mtime, inode."""

    path: Path
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = path.stat()
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(slots=True, frozen=True)
class LoadedWeights:
    """What identifies weights once loaded: their content digest and each file's stamp when read."""

    digest: str
    stamps: tuple[FileStamp, ...]

    def changed_files(self) -> list[Path]:
        """Files that are no longer what was loaded (replaced, rewritten or deleted)."""
        changed = []
        for stamp in self.stamps:
            try:
                if FileStamp.of(stamp.path) != stamp:
                    changed.append(stamp.path)
            except OSError:
                changed.append(stamp.path)
        return changed


@dataclass(slots=True)
class Weights:
    """Tensors by name, read from files whose identity is :attr:`identity`."""

    tensors: dict[str, torch.Tensor]
    digest: str
    stamps: tuple[FileStamp, ...]

    def identity(self) -> LoadedWeights:
        return LoadedWeights(self.digest, self.stamps)

    def changed_files(self) -> list[Path]:
        return self.identity().changed_files()


_digests: dict[FileStamp, str] = {}
_digests_lock = threading.Lock()


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (all shards of an index); a pickle-only folder is refused."""
    index = folder / INDEX_FILE
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a safetensors index ({exc})") from exc
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files and any(folder.glob("*.bin")):
        raise ModelLoadError(
            f"{folder} holds pickle weights (*.bin) only; the SDK loads safetensors: re-save the model "
            "with save_pretrained(..., safe_serialization=True)"
        )
    return files


def file_digest(path: Path) -> str:
    """blake2b of the whole file, cached by its stamp."""
    stamp = FileStamp.of(path)
    with _digests_lock:
        cached = _digests.get(stamp)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
    if FileStamp.of(path) != stamp:
        raise _Changed(path)
    with _digests_lock:
        _digests[stamp] = h.hexdigest()
    return h.hexdigest()


def digest_of(files: list[Path]) -> str:
    """One digest over the names and contents of ``files``."""
    return combine_digests([(f.name, _with_retry(file_digest, f)) for f in files])


def read_weights(folder: Path) -> Weights:
    """Hash and load every weight file of ``folder`` (see the module doc)."""
    files = weight_files(folder)
    if not files:
        raise ModelLoadError(f"{folder} holds no weights (*.safetensors)")
    tensors: dict[str, torch.Tensor] = {}
    stamps, digests = [], []
    for f in files:
        loaded, stamp, digest = _with_retry(_read_file, f)
        tensors.update(loaded)
        stamps.append(stamp)
        digests.append((f.name, digest))
    return Weights(tensors, combine_digests(digests), tuple(stamps))


def combine_digests(named_digests: list[tuple[str, str]]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, digest in named_digests:
        h.update(name.encode())
        h.update(digest.encode())
    return h.hexdigest()


class _Changed(Exception):
    def __init__(self, path: Path):
        super().__init__(path)
        self.path = path


def _with_retry(read, path: Path):
    """``read(path)``, once more if the file changed meanwhile; a second change is an error."""
    try:
        return read(path)
    except _Changed:
        pass
    try:
        return read(path)
    except _Changed as exc:
        raise ModelLoadError(
            f"{exc.path} changed while it was being read (a training run writing into this folder?); "
            "load it again once it is complete"
        ) from None


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], FileStamp, str]:
    from safetensors import SafetensorError, safe_open

    stamp = FileStamp.of(path)
    digest = file_digest(path)  # the content at this stamp; the stamp is checked again after the copy
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {name: fh.get_tensor(name).clone() for name in fh.keys()}  # owned, not mapped
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc})") from exc
    if FileStamp.of(path) != stamp:
        raise _Changed(path)
    return tensors, stamp, digest

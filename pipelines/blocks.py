"""Block KV of one model version in a store: refresh it and record what was written (a per-version
manifest), and collect the blocks of versions no longer served.

Block keys are content hashes under the model's fingerprint namespace, so a changed item or history
gets a new key (refresh computes it; unchanged blocks are already stored and skipped) and a new
model version gets all new keys. Stores cannot list their keys (``lm://`` has no listing), so every
refresh adds the keys it wrote to ``<repo>/data/pipeline/manifests/<store>/<fingerprint>.json`` and
garbage collection deletes exactly those. Blocks that serving computed on a miss and wrote back are
not in any manifest; they age out of LRU tiers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from rcllm_sdk.cache.base import redact_url
from rcllm_sdk.errors import PipelineStepError

MANIFESTS = Path("data") / "pipeline" / "manifests"


def manifest_dir(repo: Path, store: str) -> Path:
    """The manifests of ``store`` (one folder per store URL, named by its hash)."""
    return Path(repo) / MANIFESTS / hashlib.blake2b(store.encode(), digest_size=6).hexdigest()


def refresh_version(
    repo: Path, model: str | Path, store: str, version: str = "", active_days: float | None = None
) -> dict:
    """Compute the item blocks and the active users' history blocks of ``model`` that ``store`` lacks,
    and add their keys to the version's manifest; the refresh figures plus ``fingerprint``.

    Raises:
        PipelineStepError: some blocks could not be written (the store keeps what was written; run
            again to finish).
    """
    from rcllm_sdk.prompt.encoder import cacheable_blocks
    from rcllm_sdk.recommender import RcRecommender

    from .refresh import active_histories
    from .run import catalog_from_repo

    repo = Path(repo)
    with RcRecommender.from_feature_store(repo, model=model, mode="rcllm", store=store, guard=False) as rec:
        catalog, template, ranker = catalog_from_repo(repo), rec.ranker.template, rec.ranker
        histories = [
            [catalog[i] for i in h[-template.max_history :] if i in catalog]
            for h in active_histories(repo, active_days)
        ]
        blocks = cacheable_blocks(
            histories, list(catalog.values()), template, ranker.tokenizer, ranker.fingerprint
        )
        figures = run_refresh(rec.engine, blocks)
    if figures["write_failures"]:
        raise PipelineStepError(
            f"refresh of model {version or ranker.fingerprint}: {figures['write_failures']} blocks could not "
            f"be written to {redact_url(store)}; serving keeps the current champion; run the pipeline again"
        )
    add_to_manifest(repo, store, ranker.fingerprint, version, [b.content_hash for b in blocks])
    return {**figures, "fingerprint": ranker.fingerprint, "users": len(histories), "items": len(catalog)}


def run_refresh(engine, blocks) -> dict:
    """:func:`rcllm_sdk.runtime.refresh.refresh_blocks` without progress bars (one place to hook)."""
    from rcllm_sdk.runtime.refresh import refresh_blocks

    return refresh_blocks(engine, blocks, progress=False)


def add_to_manifest(repo: Path, store: str, fingerprint: str, version: str, keys: list[int]) -> Path:
    """Merge ``keys`` into the manifest of ``fingerprint`` in ``store`` (written atomically)."""
    folder = manifest_dir(repo, store)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{fingerprint}.json"
    known = set(read_manifest(path)["keys"]) if path.exists() else set()
    manifest = {
        "store": redact_url(store),
        "fingerprint": fingerprint,
        "version": version,
        "keys": sorted(known | {f"{k:016x}" for k in keys}),
    }
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest))
    os.replace(tmp, path)
    return path


def read_manifest(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def collect_garbage(repo: Path, store: str, keep: set[str]) -> dict:
    """Delete from ``store`` the blocks of every manifest whose fingerprint is not in ``keep``, then
    the manifest; ``{"versions": [...], "deleted": n, "not_deleted": n}``. Re-running is harmless."""
    from rcllm_sdk.cache import open_store

    folder = manifest_dir(repo, store)
    out = {"versions": [], "deleted": 0, "not_deleted": 0}
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        manifest = read_manifest(path)
        if manifest["fingerprint"] in keep:
            continue
        with open_store(store, namespace=manifest["fingerprint"]) as target:
            gone = [target.delete(int(key, 16)) for key in manifest["keys"]]
        out["versions"].append(manifest["version"] or manifest["fingerprint"])
        out["deleted"] += sum(gone)
        out["not_deleted"] += len(gone) - sum(gone)
        path.unlink()
    return out

"""All-or-nothing replacement of a feature repo's ingested files.

``rcllm ingest`` builds the new files (parquet, retriever, Feast registry and online store,
manifest, ``feature_store.yaml``) in a staging folder inside the repo, then :func:`commit` moves
them over the old ones: each old file is first renamed aside, and if any move fails every file
is put back. A failure at any step before or during the commit leaves the previous repo serving,
byte for byte. Files the ingest does not write (``data/ranker``, models, KV) are never touched.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

STAGING_DIR = ".ingest-staging"
PREVIOUS_DIR = ".ingest-previous"  # the replaced files, until the commit has finished
STORE_YAML = "feature_store.yaml"


@contextmanager
def staging_folder(repo: Path) -> Iterator[Path]:
    """An empty staging folder in ``repo`` (same file system, so moves are renames), removed on exit."""
    staging = repo / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left by a process that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def commit(staging: Path, repo: Path) -> None:
    """Move every file of ``staging`` to the same relative path in ``repo``; all of them or none.

    ``feature_store.yaml`` moves last, so the Feast configuration never points at files that are
    not yet in place. The replaced files are deleted once every move has succeeded, after the
    previous Redis namespace (if the ingest switched to a new one) is torn down.
    """
    files = sorted((p.relative_to(staging) for p in staging.rglob("*") if p.is_file()), key=_yaml_last)
    previous = repo / PREVIOUS_DIR
    shutil.rmtree(previous, ignore_errors=True)
    moved: list[Path] = []
    try:
        for relative in files:
            _set_aside(repo / relative, previous / relative)
            moved.append(relative)
            (repo / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / relative, repo / relative)
    except BaseException:
        _restore(repo, previous, moved)
        shutil.rmtree(previous, ignore_errors=True)
        raise
    _drop_previous_namespace(previous, repo)
    shutil.rmtree(previous, ignore_errors=True)


def _yaml_last(relative: Path) -> tuple[bool, str]:
    return relative == Path(STORE_YAML), str(relative)


def _set_aside(target: Path, aside: Path) -> None:
    if target.exists():
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.replace(target, aside)


def _restore(repo: Path, previous: Path, moved: list[Path]) -> None:
    """Undo a partial commit: old files back in place, new files that had no old one removed."""
    for relative in reversed(moved):
        target, aside = repo / relative, previous / relative
        if aside.exists():
            os.replace(aside, target)
        elif target.exists():
            target.unlink()


def _drop_previous_namespace(previous: Path, repo: Path) -> None:
    """Tear down the replaced ingest's Redis keys when it used another Feast project (best effort)."""
    old_yaml = previous / STORE_YAML
    if not old_yaml.exists() or "type: redis" not in old_yaml.read_text():
        return
    if project_of(old_yaml) == project_of(repo / STORE_YAML):
        return  # same namespace: its keys are the new ones
    try:
        from feast import FeatureStore

        FeatureStore(repo_path=str(previous)).teardown()
    except Exception as exc:  # the new repo serves already; stale keys only cost memory
        log.warning("could not remove the previous ingest's Redis keys (%s): %s", project_of(old_yaml), exc)


def project_of(yaml_file: Path) -> str:
    """The Feast ``project:`` of a feature_store.yaml."""
    for line in yaml_file.read_text().splitlines():
        if line.startswith("project:"):
            return line.partition(":")[2].strip()
    return ""

"""``rcllm bench-storage``, placement half (the cluster half is ``bench_cluster``): how many storage
nodes a request's candidates touch.

For each dataset, shard count and placement (``similarity``, ``hash``) one row: nodes per
request, remote KV bytes per request under affinity routing, and shard balance. Datasets are
built the way ``rcllm ingest`` builds them: leave-one-out split, item embeddings fitted on the
served histories (test items excluded), and each user's retriever top-20 candidates as a request.

Only numpy, scipy and polars are imported (no torch): the placement layer plans.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rcllm_sdk.cache.placement import ShardMap, hash_placement, similarity_placement

REPO_ROOT = Path(__file__).resolve().parents[1]
ML1M_PATH = "../shared/data/ml-1m"  # relative to the repo root; never copied into the repo
CANDIDATES = 20
# One item block of the reference workload: 64 tokens of Qwen2-0.5B KV in bf16
# (24 layers x K,V x 2 KV heads x 64 head dim x 2 bytes = 12 KiB per token).
DEFAULT_BLOCK_BYTES = 64 * 24 * 2 * 2 * 64 * 2


# ---- datasets --------------------------------------------------------------------------------
def synthetic_dataset(config=None, *, max_users: int = 2000, seed: int = 0, embedding_dim: int = 32):
    """``(item_ids [n], embeddings [n, dim] float32, requests)`` from the package's synthetic world.

    Args:
        config: a :class:`rcllm_sdk.data.synthetic.SyntheticConfig` (default: its defaults).
        max_users: at most this many requests (a seeded sample of the users).
    """
    from rcllm_sdk.data.sources import load

    return dataset_from(
        load("synthetic", synthetic=config), max_users=max_users, seed=seed, embedding_dim=embedding_dim
    )


def movielens_1m_dataset(
    path: str | Path = ML1M_PATH, *, max_users: int = 2000, seed: int = 0, embedding_dim: int = 32
):
    """Like :func:`synthetic_dataset` for MovieLens-1M (``interactions.csv.gz`` + ``items.csv``).

    ``path`` is resolved against the repo root; returns None when the folder is absent.
    """
    from rcllm_sdk.data.sources import load

    folder = REPO_ROOT / path
    if not folder.is_dir():
        return None
    return dataset_from(load("csv", folder), max_users=max_users, seed=seed, embedding_dim=embedding_dim)


def dataset_from(dataset, *, max_users: int, seed: int, embedding_dim: int = 32):
    """Split, embeddings and retriever exactly as :func:`rcllm_sdk.ingest.ingest`; one request per
    sampled user: the retriever's top-20 for the history a test prompt sees."""
    from rcllm_sdk.data.split import TEST, histories, leave_one_out
    from rcllm_sdk.ingest import fit_retriever
    from rcllm_sdk.retrieval import RetrieverConfig

    served = histories(leave_one_out(dataset.interactions), exclude=(TEST,))
    retriever = fit_retriever(served, dataset.items, embedding_dim, RetrieverConfig())
    sequences = served["item_ids"].to_list()
    rng = np.random.default_rng(seed)
    users = np.sort(rng.permutation(len(sequences))[:max_users])
    requests = [retriever.candidates(sequences[u], CANDIDATES) for u in users]
    return retriever.item_ids, retriever.embeddings, requests


# ---- the measure -----------------------------------------------------------------------------
def request_footprint(shard_map: ShardMap, candidates: list[int]) -> tuple[int, int]:
    """``(distinct shards, remote candidates)`` of one request under affinity routing.

    The request runs on the worker co-located with the node that holds most of its candidates
    (ties: the lowest shard); every other candidate's block is fetched from another node.
    """
    counts = np.bincount([shard_map.shard_for(i) for i in candidates], minlength=shard_map.n_shards)
    return int((counts > 0).sum()), int(counts.sum() - counts.max())


def placement_rows(
    dataset: str,
    item_ids,
    embeddings,
    requests: list[list[int]],
    block_bytes: int,
    shards=(4, 8, 16),
    seed: int = 0,
) -> list[dict]:
    """One row per shard count and placement (``similarity``, ``hash``).

    Row fields:
        nodes_per_request: mean distinct shards holding a request's candidate items (one node per shard).
        remote_bytes_per_request: mean bytes fetched from other nodes, ``block_bytes`` x the
            candidates not on the request's node; the request runs on the worker co-located with
            the node holding most of its candidates (affinity routing). User blocks are replicated
            on every node, so they are always local and never counted.
        max_over_mean_shard_size / min_over_mean_shard_size: largest / smallest shard over the mean.
        build_s: seconds to compute the map.

    Example:
        >>> placement_rows("toy", ids, emb, [[1, 2, 3]], block_bytes=786_432, shards=(2,))
    """
    rows = []
    for n_shards in shards:
        for placement in ("similarity", "hash"):
            start = time.perf_counter()
            shard_map = (
                similarity_placement(item_ids, embeddings, n_shards, seed=seed)
                if placement == "similarity"
                else hash_placement(item_ids, n_shards)
            )
            build_s = time.perf_counter() - start
            rows.append(
                {
                    "dataset": dataset,
                    "shards": n_shards,
                    "placement": placement,
                    **_request_figures(shard_map, requests, block_bytes),
                    **_balance_figures(shard_map, item_ids),
                    "build_s": round(build_s, 4),
                }
            )
    return rows


def _request_figures(shard_map: ShardMap, requests: list[list[int]], block_bytes: int) -> dict:
    footprints = np.array([request_footprint(shard_map, r) for r in requests], np.float64).reshape(-1, 2)
    nodes, remote = footprints.mean(axis=0) if len(requests) else (0.0, 0.0)
    return {
        "nodes_per_request": float(nodes),
        "remote_bytes_per_request": float(remote * block_bytes),
        "requests": len(requests),
    }


def _balance_figures(shard_map: ShardMap, item_ids) -> dict:
    sizes = shard_map.sizes(item_ids)
    mean = sizes.sum() / len(sizes)
    return {
        "max_over_mean_shard_size": float(sizes.max() / mean),
        "min_over_mean_shard_size": float(sizes.min() / mean),
    }


# ---- the run and its report ------------------------------------------------------------------
def placement_report(
    shards=(4, 8, 16),
    *,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    max_users: int = 2000,
    ml1m_path: str | Path = ML1M_PATH,
    seed: int = 0,
) -> dict:
    """Rows for the synthetic world and MovieLens-1M (listed under ``skipped`` when absent)."""
    loaders = {
        "synthetic": lambda: synthetic_dataset(max_users=max_users, seed=seed),
        "ml-1m": lambda: movielens_1m_dataset(ml1m_path, max_users=max_users, seed=seed),
    }
    report = {
        "block_bytes": block_bytes,
        "candidates": CANDIDATES,
        "max_users": max_users,
        "seed": seed,
        "placement": [],
        "skipped": [],
        "seconds": {},
    }
    for name, loader in loaders.items():
        start = time.perf_counter()
        data = loader()
        if data is None:
            report["skipped"].append(name)
            continue
        report["placement"] += placement_rows(name, *data, block_bytes=block_bytes, shards=shards, seed=seed)
        report["seconds"][name] = round(time.perf_counter() - start, 2)
    return report


def placement_markdown(rows: list[dict]) -> str:
    """Markdown table of :func:`placement_rows` output, with hash / similarity nodes per request."""
    hash_nodes = {
        (r["dataset"], r["shards"]): r["nodes_per_request"] for r in rows if r["placement"] == "hash"
    }
    lines = [
        "| dataset | shards | placement | nodes / request | hash / this | remote MiB / request | "
        "max / mean shard | min / mean shard | requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = hash_nodes.get((r["dataset"], r["shards"]))
        ratio_cell = f"{ratio / r['nodes_per_request']:.2f}x" if ratio and r["nodes_per_request"] else "–"
        lines.append(
            f"| {r['dataset']} | {r['shards']} | {r['placement']} | {r['nodes_per_request']:.2f} | "
            f"{ratio_cell} | {r['remote_bytes_per_request'] / 2**20:.2f} | "
            f"{r['max_over_mean_shard_size']:.3f} | {r['min_over_mean_shard_size']:.3f} | {r['requests']} |"
        )
    return "\n".join(lines)


def storage_markdown(report: dict) -> str:
    """The placement table, the node-down table when there is one, then skipped datasets."""
    parts = [placement_markdown(report["results"])]
    if "node_down" in report:
        from .bench_cluster import node_down_markdown

        parts.append(node_down_markdown(report["node_down"]))
    parts += [f"{name}: skipped (data not found)" for name in report["skipped"]]
    return "\n\n".join(parts)


def write_report(report: dict, out: str | Path) -> None:
    """``out`` (JSON) and the same name with ``.md`` (:func:`storage_markdown`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(storage_markdown(report) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--max-users", type=int, default=2000)
    parser.add_argument("--block-bytes", type=int, default=DEFAULT_BLOCK_BYTES)
    parser.add_argument("--ml1m-path", default=ML1M_PATH)
    parser.add_argument("--model", default="cpu-512x8", help="bench model preset for the node-down run")
    parser.add_argument("--nodes", type=int, default=4, help="storage nodes the node-down run starts")
    parser.add_argument("--replicas", type=int, default=1, help="item block replicas in the node-down run")
    parser.add_argument("--requests", type=int, default=16, help="timed requests per node-down phase")
    parser.add_argument("--skip-node-down", action="store_true", help="placement only (no servers, no model)")
    parser.add_argument(
        "--out", default="bench_out/bench_storage.json", help="JSON report (a .md table is written beside it)"
    )


def run_from_args(args) -> int:
    report = placement_report(
        tuple(args.shards), block_bytes=args.block_bytes, max_users=args.max_users, ml1m_path=args.ml1m_path
    )
    report["results"] = report.pop("placement")
    if not args.skip_node_down:
        from .bench_cluster import node_down_report

        report["node_down"] = node_down_report(args.model, args.nodes, args.replicas, args.requests)
    write_report(report, args.out)
    print(storage_markdown(report))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rcllm bench-storage", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

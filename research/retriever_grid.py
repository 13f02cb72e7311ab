"""Choose the retriever's blend on validation users: NDCG@10 of the top-20 candidates for a grid of
``RetrieverConfig`` settings over one or more ingested repos.

Validation scores leave the validation and test items out of the histories (and of the retriever's
fit) and ask for the validation item; test scores are what ``rcllm evaluate`` reports for the
retriever. Pick on validation, report test::

    python -m research.retriever_grid --repo /tmp/synth --repo /tmp/ml100k --repo /tmp/ml1m \\
        --decay 0.3 0.45 0.6 --w-similarity 0 0.03 0.05 0.1 0.3
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from rcllm_sdk.data.split import TEST, VAL, histories
from rcllm_sdk.evaluation.metrics import METRICS, rank_of
from rcllm_sdk.ingest import read_manifest, retriever_inputs
from rcllm_sdk.retrieval import Retriever, RetrieverConfig


def retriever_ndcg(repo: Path, config: RetrieverConfig, split: str, k: int = 20) -> float:
    """Mean NDCG@10 of the retriever's top ``k`` for the ``split`` item ("val" or "test") of every user."""
    return _ndcg(_split_inputs(repo, split), config, k)


def _ndcg(inputs: tuple, config: RetrieverConfig, k: int = 20) -> float:
    sequences, item_ids, embeddings, truth = inputs
    retriever = Retriever.fit(sequences, item_ids, embeddings, config)
    ranks = [
        rank_of(retriever.candidates(history, k), truth[n])
        for n, history in enumerate(sequences)
        if n in truth
    ]
    return float(METRICS["ndcg@10"](np.array(ranks)).mean())


def _split_inputs(repo: Path, split: str) -> tuple:
    """What every setting shares for one (repo, split): the served histories (validation scores leave
    the validation item out too), item ids, embeddings and ``{history index: truth}``."""
    interactions = pl.read_parquet(repo / "data" / "interactions.parquet")
    items = pl.read_parquet(repo / "data" / "items.parquet", columns=["item_id"])
    served = histories(interactions, exclude=(VAL, TEST) if split == VAL else (TEST,))
    truth = dict(interactions.filter(pl.col("split") == split).select("user_id", "item_id").iter_rows())
    sequences, item_ids, embeddings = retriever_inputs(served, items, read_manifest(repo)["embedding"]["dim"])
    answers = {n: truth[user] for n, user in enumerate(served["user_id"]) if user in truth}
    return sequences, item_ids, embeddings, answers


def grid(repos: list[Path], decays: list[float], similarities: list[float]) -> list[dict]:
    inputs = {(repo.name, split): _split_inputs(repo, split) for repo in repos for split in (VAL, TEST)}
    rows = []
    for decay, w_similarity in tqdm(list(itertools.product(decays, similarities)), desc="retriever grid"):
        config = replace(RetrieverConfig(), decay=decay, w_similarity=w_similarity)
        scores = {
            repo.name: {split: _ndcg(inputs[repo.name, split], config) for split in (VAL, TEST)}
            for repo in repos
        }
        rows.append(
            {"config": asdict(config), "scores": scores, "val_sum": sum(s[VAL] for s in scores.values())}
        )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repo", action="append", type=Path, required=True, help="an ingested repo (repeatable)"
    )
    parser.add_argument("--decay", type=float, nargs="+", default=[RetrieverConfig().decay])
    parser.add_argument("--w-similarity", type=float, nargs="+", default=[RetrieverConfig().w_similarity])
    args = parser.parse_args(argv)
    rows = grid(args.repo, args.decay, args.w_similarity)
    print("| decay | w_similarity | " + " | ".join(f"{r.name} val | {r.name} test" for r in args.repo) + " |")
    print("|---|---|" + "---|---|" * len(args.repo))
    for row in sorted(rows, key=lambda r: -r["val_sum"]):
        cells = " | ".join(f"{s[VAL]:.4f} | {s[TEST]:.4f}" for s in row["scores"].values())
        print(f"| {row['config']['decay']} | {row['config']['w_similarity']} | {cells} |")


if __name__ == "__main__":
    main()

"""Evaluate a trained feature repo from Python: leave-one-out accuracy of the ranker against the
retriever alone, and how well each cached mode agrees with full prefill (what `rcllm evaluate
--repo REPO --model MODEL` does).

    .venv/bin/python examples/evaluate.py --repo feature_repo --max-users 200 --out eval.json
"""

from __future__ import annotations

import argparse

from rcllm_sdk.evaluation.evaluate import EvaluateConfig, evaluate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", default="feature_repo", help="feature repo trained by `make demo`")
    parser.add_argument("--model", help="ranker to evaluate (default <repo>/data/ranker)")
    parser.add_argument("--max-users", type=int, default=200, help="first this many test users")
    parser.add_argument("--timing-samples", type=int, default=20, help="users timed per mode")
    parser.add_argument("--out", help="write the report JSON here")
    args = parser.parse_args(argv)

    config = EvaluateConfig(
        source=None,  # the repo as ingested: no new ingestion, no training
        repo=args.repo,
        model=args.model or f"{args.repo}/data/ranker",
        max_users=args.max_users,
        timing_samples=args.timing_samples,
        other_policies=(),  # only the default policy beside full and prefix
        out=args.out,
        log_mlflow=False,
        progress=False,
    )
    report = evaluate(config)  # prints the markdown tables; returns the report dict
    results = report["results"]
    diff = results["full"]["ndcg@10_diff_vs_retriever"]
    print(f"users: {report['users']}")
    print(f"ranker - retriever NDCG@10: {diff['mean']:+.4f} [{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]")
    for mode in ("prefix", "rcllm", "control:wrong_history"):
        print(f"{mode} top-1 agreement with full: {results[mode]['top1_agreement_with_full']:.3f}")
    for mode in ("full", "prefix", "rcllm"):
        print(f"{mode} TTFT p50: {results[mode]['ttft_ms_p50']:.1f} ms")


if __name__ == "__main__":
    main()

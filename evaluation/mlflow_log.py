"""The MLflow runs of ``rcllm evaluate``: a parent run with the overall figures, the per-user table,
the report and the plots, and one nested run per mode or policy; all tagged with the evaluated
model's registry version and its train run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import polars as pl

from rcllm_sdk.runtime.policies import parse_policy

from . import figures

OVERALL = ("retriever", "full")


def log_evaluation(
    report: dict,
    per_user: dict,
    users: list[int],
    truth: dict,
    ttft_samples: dict[str, list[float]],
    repo: Path,
    out: str | Path | None = None,
    tags: dict | None = None,
) -> str:
    """Log ``report`` (``evaluate``'s) as a parent run with nested per-mode runs; the parent's id."""
    import mlflow

    from rcllm_sdk.pipelines.registry import lookup
    from rcllm_sdk.tracking import configure, flat_metrics, log_artifacts, log_params, start_run

    configure(repo)  # the registry the model came from: MLFLOW_TRACKING_URI, else the repo's store
    version, train_run = lookup(report["config"]["model"])
    run_tags = {"rcllm.model_version": version, "rcllm.train_run_id": train_run, **(tags or {})}
    results = report["results"]
    with start_run("rcllm-evaluate", repo, run_name="evaluate", tags=run_tags) as parent:
        config = report["config"]
        log_params(
            {
                "dataset": report["dataset"],
                "users": report["users"],
                "model": config["model"],
                "candidates": config["candidates"],
                "policy": config["policy"],
                "store": config["store"],
                "timing_samples": config["timing"]["samples"],
            }
        )
        mlflow.log_metrics(dict(flat_metrics({k: results[k] for k in OVERALL if k in results})))
        for name, figures_of_mode in results.items():
            with start_run("rcllm-evaluate", repo, run_name=name, tags=run_tags, nested=True):
                log_params({"mode": name.split(":")[0], "policy": _policy_of(name, config["policy"])})
                mlflow.log_metrics(dict(flat_metrics(figures_of_mode)))
        with tempfile.TemporaryDirectory() as tmp:
            log_artifacts(_files(Path(tmp), results, per_user, users, truth, ttft_samples, out))
        return parent.info.run_id


def _policy_of(name: str, default: str) -> str:
    if name.startswith("rcllm:"):
        return parse_policy(name.removeprefix("rcllm:")).spec
    return default if name in ("rcllm", "control:wrong_history") else ""


def _files(tmp: Path, results, per_user, users, truth, ttft_samples, out) -> dict[str, Path]:
    table = tmp / "per_user.csv"
    columns = {"user_id": users, "truth": [truth[u] for u in users]}
    columns.update({f"rank_{name}": ranks for name, ranks in per_user.items()})
    pl.DataFrame(columns).write_csv(table)
    files = {"evaluation": table}
    plots = tmp / "figures"
    plots.mkdir()
    if ttft_samples:
        figures.ttft_cdf(ttft_samples, plots / "ttft_cdf.png")
    figures.accuracy_vs_ttft(results, plots / "accuracy_vs_ttft.png")
    figures.recompute_vs_agreement(results, plots / "recompute_vs_agreement.png")
    files["figures"] = plots
    if out:
        files["report"] = Path(out)
    return files


def log_bench(report: dict, out: str | Path | None = None) -> str:
    """One ``rcllm-bench`` run: warm and cold TTFT p50 per workload and mode as metrics, a bar chart
    per workload, the report files; its id."""
    import mlflow

    from rcllm_sdk.tracking import log_artifacts, log_params, start_run

    with start_run("rcllm-bench", run_name="bench") as run, tempfile.TemporaryDirectory() as tmp:
        log_params({k: v for k, v in report.items() if not isinstance(v, (dict, list))})
        plots = Path(tmp) / "figures"
        plots.mkdir()
        for name, workload in report.get("workloads", {}).items():
            for phase, modes in (("warm", workload["modes"]), ("cold", workload["cold"]["modes"])):
                p50 = {mode: figures["ttft_ms_p50"] for mode, figures in modes.items()}
                mlflow.log_metrics(
                    {f"{name}.{phase}.{m}.ttft_ms_p50".replace(":", "_"): v for m, v in p50.items()}
                )
                figures.bar_chart(
                    p50, plots / f"{name}_{phase}_ttft.png", "TTFT p50 (ms)", f"{name}, {phase}"
                )
        files = {"figures": plots}
        if out and Path(out).exists():
            files["report"] = Path(out)
        log_artifacts(files)
        return run.info.run_id


def log_refresh(repo: Path, figures_of_refresh: dict, store: str, model: str | None) -> str:
    """One ``rcllm-refresh`` run: the refresh counts and rates, and their bar chart; its id."""
    import mlflow

    from rcllm_sdk.cache.base import redact_url
    from rcllm_sdk.tracking import log_artifacts, log_params, start_run

    numbers = {
        k: v for k, v in figures_of_refresh.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    with start_run("rcllm-refresh", repo, run_name="refresh") as run, tempfile.TemporaryDirectory() as tmp:
        log_params({"store": redact_url(store), "model": model or f"{repo}/data/ranker"})
        mlflow.log_metrics(numbers)
        counts = {
            k: numbers[k] for k in ("blocks", "computed", "already_stored", "write_failures") if k in numbers
        }
        plots = Path(tmp) / "figures"
        plots.mkdir()
        figures.bar_chart(counts, plots / "refresh_blocks.png", "blocks", "refresh")
        log_artifacts({"figures": plots})
        return run.info.run_id

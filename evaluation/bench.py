"""``rcllm bench``: TTFT of ``full``, ``prefix`` and ``rcllm`` (per policy), interleaved in one run.

Two workloads (``WORKLOADS``): ``reference`` (20 candidates, item blocks of about 64 tokens,
50-item histories) and ``long_item`` (50 candidates, item blocks of about 128 tokens). The
model has random weights (timing only; accuracy is ``rcllm evaluate``'s job) and is sized
so that compute dominates. Requests come from a seeded stream: candidates drawn by Zipf
popularity, a share of repeat users whose history grew since their last visit.

Warm cache: before timing, the refresh pipeline's work is done for both cached modes —
every block a request needs is precomputed for ``rcllm``, and the token prefix up to the
end of the user block (system + history) is stored for ``prefix``, its most generous
realistic state. Cold cache: the store holds nothing of the request; each mode's writes are
deleted after it ran. ``full`` is the plain Hugging Face forward. Ratios are ratios of p50s.

Only numpy, torch, transformers and tokenizers are imported, so the same file runs on a
bare GPU machine (``--device cuda --store memory://``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.scoring import score_full
from rcllm_sdk.model.tokenizer import label_token_ids
from rcllm_sdk.prompt.renderer import USER
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.policies import parse_policy
from rcllm_sdk.runtime.refresh import refresh_blocks

from .bench_config import MODELS, WORKLOADS, BenchConfig, Workload, add_arguments, config_from_args
from .bench_world import (  # noqa: F401  (re-exported: bench_cluster and the sweep build on them)
    _dtype,
    bench_catalog,
    build_bench_ranker,
    render_requests,
    request_blocks,
    request_stream,
)
from .sweep import markdown as sweep_markdown
from .sweep import run_sweep


# ---- timing ----------------------------------------------------------------------------------
class RecordingStore:
    """Wraps a store; remembers every key written so a cold-cache run can forget them."""

    def __init__(self, store):
        self.inner, self.written = store, set()

    def batched_put(self, items, placement=None):
        self.written.update(k for k, _ in items)
        return self.inner.batched_put(items, placement)

    def batched_get(self, keys, placement=None):
        return self.inner.batched_get(keys, placement)

    def batched_read(self, keys, placement=None):
        return self.inner.batched_read(keys, placement)

    def batched_contains(self, keys):
        return self.inner.batched_contains(keys)

    def batched_stored(self, keys, placement=None):
        return self.inner.batched_stored(keys, placement)

    def forget(self) -> None:
        for key in self.written:
            self.inner.delete(key)
        self.written.clear()

    def close(self) -> None:
        self.inner.close()


def _timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000.0, result


def _mode_runners(engine: BlockEngine, config: BenchConfig):
    """``name -> fn(prompt, label_ids) -> (fraction recomputed, prefix hit fraction, kv bytes, misses)``,
    the dict where each rcllm mode leaves its logits of the latest prompt (for the A/B check), and
    every engine the runners write back through (to flush)."""
    model, pad = engine.ranker.model, engine.ranker.tokenizer.pad_token_id

    def full(prompt, labels):
        score_full(model, [prompt.input_ids], [labels], pad)
        return 1.0, 0.0, 0, 0

    def prefix(prompt, labels):
        cache = engine.score_prefix([prompt], [labels])[0].cache
        return cache.recomputed_fraction, 1.0 - cache.recomputed_fraction, cache.kv_bytes_read, cache.misses

    def rcllm(name, policy, scorer=engine):
        def run(prompt, labels):
            scored = scorer.score([prompt], [labels], policy)[0]
            logits[name] = scored.logits
            return scored.cache.recomputed_fraction, 0.0, scored.cache.kv_bytes_read, scored.cache.misses

        return run

    logits: dict[str, torch.Tensor] = {}  # each rcllm mode's logits for the current prompt
    engines = [engine]
    runners = {"full": full, "prefix": prefix, "rcllm": rcllm("rcllm", parse_policy(config.policy))}
    for spec in config.other_policies:
        name = f"rcllm:{parse_policy(spec).spec}"
        runners[name] = rcllm(name, parse_policy(spec))
    if config.ab_attention:  # the default policy again, attention forced to another backend
        twin = BlockEngine(
            engine.ranker, engine.store, config.policy, config.ab_attention, guard=config.guard
        )
        name = f"rcllm@{config.ab_attention}"
        runners[name] = rcllm(name, parse_policy(config.policy), twin)
        engines.append(twin)
    return runners, logits, engines


def _measure(
    engines, prompts, labels, runners, logits, store: RecordingStore, device: str, cold: bool, progress
) -> dict:
    samples = {name: [] for name in runners}
    names = list(runners)
    twins = [name for name in names if name.startswith("rcllm@")]
    diffs = {name: [] for name in twins}
    for n, (prompt, label_ids) in enumerate(zip(prompts, labels, strict=False)):
        order = names[n % len(names) :] + names[: n % len(names)]  # rotate: no mode always goes first
        for name in order:
            ms, figures = _timed(lambda run=runners[name], p=prompt, y=label_ids: run(p, y), device)
            samples[name].append((ms, *figures))
            for engine in engines:  # write-back runs beside the request (as LMCache's does); not part of TTFT
                engine.flush()
            if cold:
                store.forget()
        for name in twins:
            diffs[name].append(float((logits[name].float() - logits["rcllm"].float()).abs().max()))
        progress(n + 1, len(prompts))
    out = {name: _summary(rows) for name, rows in samples.items()}
    for name in twins:
        out[name]["max_abs_logit_diff_vs_rcllm"] = max(diffs[name])
    return out


def _summary(rows) -> dict:
    ms = np.array([r[0] for r in rows])
    out = {
        "n": len(ms),
        "ttft_ms_p50": float(np.percentile(ms, 50)),
        "ttft_ms_p95": float(np.percentile(ms, 95)),
        "ttft_ms_mean": float(ms.mean()),
        "recompute_fraction": float(np.mean([r[1] for r in rows])),
        "prefix_hit_fraction": float(np.mean([r[2] for r in rows])),
        "kv_bytes_read_mean": float(np.mean([r[3] for r in rows])),
        "cache_misses_mean": float(np.mean([r[4] for r in rows])),
    }
    if len(ms) >= 100:
        out["ttft_ms_p99"] = float(np.percentile(ms, 99))
    return out


def _ratios(modes: dict) -> dict:
    rc = modes["rcllm"]["ttft_ms_p50"]
    out = {
        "full_over_rcllm": modes["full"]["ttft_ms_p50"] / rc,
        "prefix_over_rcllm": modes["prefix"]["ttft_ms_p50"] / rc,
        "full_over_prefix": modes["full"]["ttft_ms_p50"] / modes["prefix"]["ttft_ms_p50"],
    }
    for name, m in modes.items():
        if name.startswith(("rcllm:", "rcllm@")):
            out[f"prefix_over_{name}"] = modes["prefix"]["ttft_ms_p50"] / m["ttft_ms_p50"]
        if name.startswith("rcllm@"):  # the A/B: > 1 means the forced backend was slower
            out[f"{name}_over_rcllm"] = m["ttft_ms_p50"] / rc
    return out


# ---- the run ---------------------------------------------------------------------------------
def run_bench(config: BenchConfig, out: str | Path | None = None, progress: bool = True) -> dict:
    """Time the workloads (or, with ``config.sweep``, the size sweep and the profile); write
    JSON + markdown to ``out`` when given."""
    if config.threads:
        torch.set_num_threads(config.threads)
    workloads = [WORKLOADS[name] for name in config.workloads] if config.sweep is None else []
    sizing = workloads or [Workload("sweep", 20, max(config.sweep.tokens), config.sweep.history)]
    ranker, templates, catalog = build_bench_ranker(config, sizing)
    from rcllm_sdk.cache import open_store  # lazy: the store backends are optional on a bare GPU machine

    # The CPU tier must hold a workload's blocks (long_item: ~1.3 GB), or evictions turn warm
    # requests into partly cold ones; the misses column shows whether it did.
    options = {"max_local_cpu_gb": 4.0} if not config.store.startswith("memory://") else {}
    store = RecordingStore(open_store(config.store, namespace=ranker.fingerprint, **options))
    report = _header(config, ranker)
    try:
        if config.sweep is not None:
            report.update(run_sweep(config, ranker, catalog, store, SWEEP_STEPS, progress))
        else:
            report["workloads"] = _run_workloads(
                config, ranker, templates, catalog, store, workloads, progress
            )
    finally:
        store.close()
    if out:
        write_report(report, Path(out))
    return report


def _header(config: BenchConfig, ranker) -> dict:
    return {
        "machine": machine(config),
        "model": {
            "preset": config.model,
            **MODELS[config.model],
            "dtype": str(_dtype(config)).removeprefix("torch."),
            "parameters": sum(p.numel() for p in ranker.model.parameters()),
        },
        "stream": asdict(config.stream),
        "policy": parse_policy(config.policy).spec,
        "guard": config.guard,
    }


def _run_workloads(config, ranker, templates, catalog, store, workloads, progress) -> dict:
    engine = BlockEngine(ranker, store, config.policy, config.attention, guard=config.guard)
    try:
        return {
            w.name: _run_workload(
                engine, store, ranker, templates[w.name], catalog, w, config, salt, progress
            )
            for salt, w in enumerate(workloads)
        }
    finally:
        engine.close()


def _run_workload(
    engine,
    store,
    ranker,
    template,
    catalog,
    workload: Workload,
    config: BenchConfig,
    salt: int,
    progress: bool,
) -> dict:
    engine.ranker = Ranker(ranker.model, ranker.tokenizer, template, ranker.fingerprint)
    n_warm, n_cold = config.warm_samples[workload.name], config.cold_samples[workload.name]
    requests = request_stream(config.stream, workload, n_warm + n_cold, salt)
    prompts = render_requests(requests, catalog, template, ranker)
    labels = label_token_ids(ranker.tokenizer, template.labels[: workload.candidates])
    labels = [labels] * len(prompts)
    runners, logits, engines = _mode_runners(engine, config)
    show = _progress_printer(workload.name, progress)
    _warmup(engines, runners, prompts[0], labels[0], store, config.device)
    cold = _measure(
        engines,
        prompts[n_warm:],
        labels[n_warm:],
        runners,
        logits,
        store,
        config.device,
        True,
        lambda i, n: show("cold", i, n),
    )
    _prepare_warm(engine, prompts[:n_warm], template, ranker, requests[:n_warm], catalog, progress)
    warm = _measure(
        engines,
        prompts[:n_warm],
        labels[:n_warm],
        runners,
        logits,
        store,
        config.device,
        False,
        lambda i, n: show("warm", i, n),
    )
    for twin in engines[1:]:
        twin.close()
    tokens = [len(p.input_ids) for p in prompts]
    return {
        "candidates": workload.candidates,
        "history_items": workload.history,
        "item_block_tokens_mean": float(
            np.mean([len(b.token_ids) for p in prompts for b in p.blocks if b.kind == "item"])
        ),
        "prompt_tokens_p50": float(np.median(tokens)),
        "warm_samples": n_warm,
        "cold_samples": n_cold,
        "modes": warm,
        "ratios": _ratios(warm),
        "cold": {"modes": cold, "ratios": _ratios(cold)},
    }


def _warmup(engines, runners, prompt, labels, store: RecordingStore, device: str) -> None:
    """One untimed pass per mode (allocator, thread pools), then forget its writes."""
    for run in runners.values():
        _timed(lambda run=run: run(prompt, labels), device)
    for engine in engines:
        engine.flush()
    store.forget()


def _prepare_warm(engine, prompts, template, ranker, requests, catalog, progress: bool) -> None:
    """What the refresh pipeline keeps stored: every block (rcllm) and each user's
    system+history token prefix (prefix caching)."""
    refresh_blocks(engine, request_blocks(requests, catalog, template, ranker), progress=progress)
    for prompt in prompts:
        end = next(b.end for b in prompt.blocks if b.kind == USER)
        engine.store_prefix(prompt.input_ids[:end])
    engine.flush()
    engine.store.written.clear()  # these stay: they are the warm state


def _progress_printer(name: str, enabled: bool):
    def show(phase, i, n):
        if enabled:
            print(f"\r{name} {phase}: {i}/{n} requests", end="\n" if i == n else "", flush=True)

    return show


def machine(config: BenchConfig) -> dict:
    import os

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": config.device,
    }
    if config.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    return info


# ---- output ----------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    if "sweep" in report:
        return sweep_markdown(report)
    lines = [
        "| workload | mode | warm p50 ms | warm p95 ms | cold p50 ms | recomputed | prefix hit "
        "| full / mode | prefix / mode |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, w in report["workloads"].items():
        full, prefix = w["modes"]["full"]["ttft_ms_p50"], w["modes"]["prefix"]["ttft_ms_p50"]
        for mode, m in w["modes"].items():
            cold = w["cold"]["modes"][mode]["ttft_ms_p50"]
            lines.append(
                f"| {name} | {mode} | {m['ttft_ms_p50']:.1f} | {m['ttft_ms_p95']:.1f} | {cold:.1f} | "
                f"{m['recompute_fraction']:.3f} | {m['prefix_hit_fraction']:.3f} | "
                f"{full / m['ttft_ms_p50']:.2f}x | {prefix / m['ttft_ms_p50']:.2f}x |"
            )
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rcllm bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


def run_from_args(args) -> int:
    config = config_from_args(args)
    print("stream:", json.dumps(asdict(config.stream)))
    report = run_bench(config, args.out)
    if not getattr(args, "no_mlflow", False):
        from .mlflow_log import log_bench

        log_bench(report, args.out)
    print(markdown(report))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


SWEEP_STEPS = SimpleNamespace(warmup=_warmup, prepare_warm=_prepare_warm, measure=_measure)

if __name__ == "__main__":
    raise SystemExit(main())

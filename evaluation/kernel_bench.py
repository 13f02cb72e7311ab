"""Kernel benchmark: the Triton selective-attention kernel against torch SDPA with a boolean mask.

    python -m rcllm_sdk.evaluation.kernel_bench --out DIR          # CUDA: the full grid of shapes
    python evaluation/kernel_bench.py --out DIR                    # the same from a bare checkout
    python -m rcllm_sdk.evaluation.kernel_bench --cpu --out DIR    # tiny shapes, Triton interpreter

Methods: ``triton`` (the kernel, wrapper included: it validates the offsets with one host copy),
``sdpa`` (one masked SDPA call per request in the input dtype), ``torch_ref`` (the reference
path, ``selective_attention_torch``: the same calls after an fp32 upcast) and ``flash_attn``
(``flash_attn_varlen_func``, only when it imports; its causal mask is by index, not by
position, so it is timed as a lower bound and never verified). Every other result is checked
against ``torch_ref`` before it is timed. Times are medians of CUDA-event timings after warm-up
(wall-clock on CPU). Writes ``kernel_bench.json`` and ``kernel_bench.md`` into ``--out``.

Imports torch and triton only (no Feast, MLflow, polars, LMCache), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

GPU_GRID = dict(
    keys=[2048, 4096, 8192],
    fractions=[0.05, 0.10, 0.20],
    batches=[1, 4, 16],
    dtypes=["float16", "bfloat16"],
    heads=(32, 8, 128),
    reps=20,
)
CPU_GRID = dict(
    keys=[64], fractions=[0.25], batches=[1, 2], dtypes=["float32", "float16"], heads=(4, 2, 64), reps=2
)
TOL = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}


def load_kernels():
    """``(attention, triton_attention)`` modules: the installed package, else this checkout's kernels/."""
    try:
        from rcllm_sdk.kernels import attention, triton_attention

        return attention, triton_attention
    except ImportError:
        folder = Path(__file__).resolve().parent.parent / "kernels"
        spec = importlib.util.spec_from_file_location(
            "_rcllm_kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
        return (
            importlib.import_module("_rcllm_kernels.attention"),
            importlib.import_module("_rcllm_kernels.triton_attention"),
        )


def make_case(
    batch: int, keys: int, fraction: float, dtype: torch.dtype, heads: tuple, device: str, seed: int
):
    """``batch`` requests of ``keys`` keys at positions 0..keys-1; a sorted random ``fraction`` selected."""
    hq, hkv, d = heads
    g = torch.Generator().manual_seed(seed)
    n_sel = max(1, round(fraction * keys))
    q_pos = torch.cat([torch.randperm(keys, generator=g)[:n_sel].sort().values for _ in range(batch)])
    k_pos = torch.arange(keys).repeat(batch)
    cu_q, cu_k = torch.arange(batch + 1) * n_sel, torch.arange(batch + 1) * keys
    q = torch.randn(batch * n_sel, hq, d, generator=g).to(dtype)  # [Nq, Hq, D]
    k, v = (torch.randn(batch * keys, hkv, d, generator=g).to(dtype) for _ in range(2))  # [Nk, Hkv, D]
    return tuple(t.to(device) for t in (q, k, v, q_pos, k_pos, cu_q, cu_k))


def sdpa_masked(q, k, v, q_pos, k_pos, cu_q, cu_k):
    """One SDPA call per request with a boolean position mask, in the input dtype."""
    out = torch.empty_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for qs, qe, ks, ke in zip(bq, bq[1:], bk, bk[1:], strict=False):
        mask = k_pos[None, ks:ke] <= q_pos[qs:qe, None]  # [n, T]
        o = F.scaled_dot_product_attention(
            q[qs:qe].transpose(0, 1),
            k[ks:ke].transpose(0, 1),
            v[ks:ke].transpose(0, 1),
            attn_mask=mask,
            enable_gqa=True,
        )
        out[qs:qe] = o.transpose(0, 1)
    return out


def flash_varlen():
    """``flash_attn_varlen_func`` adapted to the benchmark's arguments, or None when not installed."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None

    def run(q, k, v, q_pos, k_pos, cu_q, cu_k):
        n_q, n_k = int((cu_q[1:] - cu_q[:-1]).max()), int((cu_k[1:] - cu_k[:-1]).max())
        return flash_attn_varlen_func(q, k, v, cu_q.int(), cu_k.int(), n_q, n_k, causal=True)

    return run


def median_ms(fn, reps: int, cuda: bool) -> float:
    for _ in range(2 if cuda else 1):
        fn()
    if not cuda:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_case(methods: dict, case: tuple, dtype_name: str, reps: int, cuda: bool) -> dict:
    """Verify each method against ``torch_ref``, then time it."""
    reference = methods["torch_ref"](*case).float()
    result = {}
    for name, fn in methods.items():
        entry = {"verified": name != "flash_attn"}
        if entry["verified"]:
            err = (fn(*case).float() - reference).abs().max().item()
            entry.update(max_abs_err=err, ok=err <= TOL[dtype_name] * (1 + reference.abs().max().item()))
            if not entry["ok"]:
                result[name] = entry
                continue
        entry["ms"] = median_ms(lambda fn=fn: fn(*case), reps, cuda)
        result[name] = entry
    return result


def visible_pairs(case: tuple) -> int:
    _, _, _, q_pos, k_pos, cu_q, cu_k = case
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return sum(
        int((k_pos[None, ks:ke] <= q_pos[qs:qe, None]).sum())
        for qs, qe, ks, ke in zip(bq, bq[1:], bk, bk[1:], strict=False)
    )


def versions(cuda: bool) -> dict:
    import triton

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import flash_attn

        out["flash_attn"] = flash_attn.__version__
    except ImportError:
        out["flash_attn"] = None
    return out


def markdown(report: dict) -> str:
    names = report["methods"]
    head = (
        "| dtype | B | keys | selected | rows | "
        + " | ".join(f"{n} ms" for n in names)
        + " | sdpa / triton | triton TFLOP/s | triton max err |"
    )
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in report["results"]:
        ms = {n: r["methods"][n].get("ms") for n in names}
        cells = [f"{ms[n]:.3f}" if ms[n] is not None else "FAILED" for n in names]
        tri = r["methods"]["triton"]
        ratio = f"{ms['sdpa'] / ms['triton']:.2f}x" if ms["sdpa"] and ms["triton"] else "-"
        tflops = f"{r['flop'] / ms['triton'] / 1e9:.1f}" if ms["triton"] else "-"
        lines.append(
            f"| {r['dtype']} | {r['batch']} | {r['keys']} | {r['fraction']:.0%} | {r['rows']} | "
            + " | ".join(cells)
            + f" | {ratio} | {tflops} | {tri.get('max_abs_err', 0):.1e} |"
        )
    v = report["versions"]
    note = (
        "flash_attn: timed only (its causal mask is by index)"
        if "flash_attn" in names
        else "flash_attn: not installed"
    )
    return (
        f"Selective attention, {report['device']}; Hq/Hkv/D = {report['heads']}; medians of "
        f"{report['reps']} runs; python {v['python']}, torch {v['torch']}, triton {v['triton']}, "
        f"cuda {v['cuda']}. {note}.\n\n" + "\n".join(lines) + "\n"
    )


def benchmark(grid: dict, cuda: bool) -> dict:
    attention, triton_attention = load_kernels()
    methods = {
        "triton": triton_attention.selective_attention_triton,
        "sdpa": sdpa_masked,
        "torch_ref": attention.selective_attention_torch,
    }
    if cuda and flash_varlen() is not None:
        methods["flash_attn"] = flash_varlen()
    device = "cuda" if cuda else "cpu"
    hq, hkv, d = grid["heads"]
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
        "heads": f"{hq}/{hkv}/{d}",
        "reps": grid["reps"],
        "methods": list(methods),
        "versions": versions(cuda),
        "results": [],
    }
    combos = itertools.product(grid["dtypes"], grid["batches"], grid["keys"], grid["fractions"])
    for seed, (dtype_name, batch, keys, fraction) in enumerate(combos):
        case = make_case(batch, keys, fraction, getattr(torch, dtype_name), grid["heads"], device, seed)
        row = {
            "dtype": dtype_name,
            "batch": batch,
            "keys": keys,
            "fraction": fraction,
            "rows": case[0].shape[0],
            "flop": 4 * d * hq * visible_pairs(case),
            "methods": run_case(methods, case, dtype_name, grid["reps"], cuda),
        }
        report["results"].append(row)
        print(
            f"  {dtype_name} B={batch} keys={keys} sel={fraction:.0%}: "
            + ", ".join(f"{n} {e.get('ms', float('nan')):.3f} ms" for n, e in row["methods"].items()),
            flush=True,
        )
        del case
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path, help="folder for kernel_bench.json and kernel_bench.md")
    p.add_argument(
        "--cpu", action="store_true", help="tiny shapes under the Triton interpreter (no GPU needed)"
    )
    p.add_argument("--reps", type=int, help="timed runs per method (default: 20 on CUDA, 2 on CPU)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        if not args.cpu:
            p.error("no CUDA device: pass --cpu for the interpreter smoke run")
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel is jitted and run
    grid = dict(GPU_GRID if cuda else CPU_GRID)
    grid["reps"] = args.reps or grid["reps"]
    print("versions:", json.dumps(versions(cuda)), flush=True)
    report = benchmark(grid, cuda)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_bench.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (args.out / "kernel_bench.md").write_text(table)
    print(table)
    failed = [r for r in report["results"] for e in r["methods"].values() if e.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

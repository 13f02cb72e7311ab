"""Markdown rendering of an evaluation report."""

from __future__ import annotations

COLUMNS = ["ndcg@5", "ndcg@10", "recall@5", "recall@10", "mrr@10"]


def _cell(entry: dict, name: str) -> str:
    ci = entry.get(f"{name}_ci")
    return f"{entry[name]:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{entry[name]:.4f}"


def markdown_table(report: dict) -> str:
    """Accuracy of every entry with 95% intervals and TTFT; then how each cached mode agrees with ``full``."""
    head = f"**{report['dataset']}**, {report['users']} test users (metric [95% bootstrap interval])\n\n"
    lines = [
        "| mode | " + " | ".join(COLUMNS) + " | ttft_ms p50 | ttft_ms p95 |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for mode, entry in report["results"].items():
        ttft = [f"{entry[k]:.1f}" if k in entry else "–" for k in ("ttft_ms_p50", "ttft_ms_p95")]
        lines.append(
            f"| {mode} | " + " | ".join(_cell(entry, c) for c in COLUMNS) + " | " + " | ".join(ttft) + " |"
        )
    diff = report["results"].get("full", {}).get("ndcg@10_diff_vs_retriever")
    tail = ""
    if diff:
        tail = (
            f"\n\nNDCG@10 full − retriever (paired): {diff['mean']:+.4f} "
            f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]"
        )
    return head + "\n".join(lines) + tail + agreement_table(report)


def agreement_table(report: dict) -> str:
    rows = [(mode, e) for mode, e in report["results"].items() if "top1_agreement_with_full" in e]
    if not rows:
        return ""
    lines = [
        "\n\n| mode vs full | recomputed | top-1 agreement | top-10 overlap | NDCG@10 relative diff [95%] |",
        "|---|---|---|---|---|",
    ]
    for mode, e in rows:
        rel = e["ndcg@10_rel_diff_vs_full"]
        lines.append(
            f"| {mode} | {e['recompute_fraction']:.3f} | {e['top1_agreement_with_full']:.3f} | "
            f"{e['top10_overlap_with_full']:.3f} | {rel['mean']:+.2%} "
            f"[{rel['ci'][0]:+.2%}, {rel['ci'][1]:+.2%}] |"
        )
    return "\n".join(lines)


def demo_summary(report: dict) -> str:
    """The lines ``rcllm demo`` ends with: warm TTFT of rcllm vs prefix vs full, their rankings'
    agreement, the control's, and the ranker's NDCG@10 gain over the retriever."""
    r = report["results"]
    full, prefix, rcllm, control = r["full"], r["prefix"], r["rcllm"], r["control:wrong_history"]
    diff = full["ndcg@10_diff_vs_retriever"]
    return "\n".join(
        [
            f"TTFT p50 (warm, {rcllm['timing_samples']} users new to each engine): rcllm "
            f"{rcllm['ttft_ms_p50']:.1f} ms, prefix {prefix['ttft_ms_p50']:.1f} ms, full "
            f"{full['ttft_ms_p50']:.1f} ms -> rcllm/full {rcllm['ttft_ms_p50'] / full['ttft_ms_p50']:.2f}x, "
            f"rcllm/prefix {rcllm['ttft_ms_p50'] / prefix['ttft_ms_p50']:.2f}x",
            f"same ranking as full: rcllm top-1 {rcllm['top1_agreement_with_full']:.3f}, top-10 "
            f"{rcllm['top10_overlap_with_full']:.3f}; prefix top-1 {prefix['top1_agreement_with_full']:.3f}",
            f"control (another user's history): top-1 agreement {control['top1_agreement_with_full']:.3f} "
            "(the ranker reads the history)",
            f"ranker vs retriever NDCG@10 (paired): {diff['mean']:+.4f} "
            f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]",
        ]
    )

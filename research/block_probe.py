"""A content probe for block KV reuse: does a model that must match the history to a candidate
keep its accuracy when blocks are reused and only a few tokens recomputed, with and without
block-aware training?

The recommender's ranker here does not read content yet (NOTEBOOK.md, "What the ranker learns"),
so it cannot show what reuse costs. This probe trains three small Llama models from scratch on
the smallest task that needs the same circuit, in the same block layout the server uses:

    [SYSTEM] [USER: the item the user wants] ([LABEL k] [ITEM k]) x K [QUERY]  ->  label of the match

and scores held-out prompts with the plain HF forward (``full``) and with ``BlockEngine`` under
each policy. One model trains with full causal attention, one with the block-aware mask
(``pipelines/block_mask.py``), one with half of its prompts each way (``mixed``).
``python -m research.block_probe --out FILE.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rcllm_sdk.cache import open_store
from rcllm_sdk.model.ranker import Ranker
from rcllm_sdk.model.scoring import score_full
from rcllm_sdk.pipelines.block_mask import block_attention_mask, mixed_layouts
from rcllm_sdk.prompt.renderer import Block, RenderedPrompt, block_hash
from rcllm_sdk.runtime.engine import BlockEngine
from rcllm_sdk.runtime.policies import parse_policy

SYSTEM_IDS, USER_MARK, QUERY_IDS = (1, 2, 2, 2), 3, (4, 5)
LABEL0, ITEM0 = 10, 40  # label k is token LABEL0 + k; item tokens start at ITEM0
POLICIES = ("full", "none", "block_head:1", "block_head:2", "deviation:0.15:1")


@dataclass(slots=True)
class ProbeConfig:
    candidates: int = 4
    item_tokens: int = 3
    items: int = 300
    hidden: int = 128
    layers: int = 2
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    eval_prompts: int = 400
    seed: int = 0


def make_prompt(rng: np.random.Generator, cfg: ProbeConfig) -> tuple[RenderedPrompt, int]:
    """One prompt of the task and the index of its answer."""
    pool = rng.choice(cfg.items, size=cfg.candidates * cfg.item_tokens, replace=False) + ITEM0
    items = pool.reshape(cfg.candidates, cfg.item_tokens).tolist()
    target = int(rng.integers(cfg.candidates))
    parts = [("system", SYSTEM_IDS), ("user", (USER_MARK, *items[target]))]
    for k, item in enumerate(items):
        parts += [("label", (LABEL0 + k,)), ("item", tuple(item))]
    parts.append(("query", QUERY_IDS))
    blocks, start = [], 0
    for kind, ids in parts:
        blocks.append(Block(kind, tuple(ids), start, block_hash("probe", kind, ids)))
        start += len(ids)
    return RenderedPrompt(
        tuple(blocks), tuple(range(cfg.candidates)), tuple("ABCDEFGHIJKLMNOPQRST"[: cfg.candidates])
    ), target


def build_model(cfg: ProbeConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=ITEM0 + cfg.items,
        hidden_size=cfg.hidden,
        intermediate_size=3 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=max(2, cfg.hidden // 32),
        num_key_value_heads=max(1, cfg.hidden // 64),
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


MODELS = {"standard": 0.0, "block_aware": 1.0, "mixed": 0.5}  # name -> share of block-aware prompts


def train(cfg: ProbeConfig, block_fraction: float, progress: bool = True) -> tuple[LlamaForCausalLM, dict]:
    """Train on fresh random prompts (all of one length, so no padding); each prompt sees the
    block-aware mask with probability ``block_fraction``, plain causal attention otherwise."""
    model, rng = build_model(cfg), np.random.default_rng(cfg.seed + 1)
    labels = torch.arange(LABEL0, LABEL0 + cfg.candidates)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(cfg.steps):
        batch = [make_prompt(rng, cfg) for _ in range(cfg.batch_size)]
        ids = torch.tensor([p.input_ids for p, _ in batch])
        mask = None
        if block_fraction > 0:
            layouts = [[(b.kind, len(b.token_ids)) for b in p.blocks] for p, _ in batch]
            mask = block_attention_mask(mixed_layouts(layouts, block_fraction, rng), ids.shape[1])
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -1]
        loss = torch.nn.functional.cross_entropy(
            hidden @ model.lm_head.weight[labels].T, torch.tensor([t for _, t in batch])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if progress and (step % 250 == 0 or step == cfg.steps - 1):
            print(
                f"  block-aware share {block_fraction:.2f} step {step}: label CE "
                f"{np.mean(losses[-50:]):.3f} (ln K = {math.log(cfg.candidates):.3f})",
                flush=True,
            )
    model.eval()
    return model, {
        "final_loss": float(np.mean(losses[-100:])),
        "train_seconds": time.perf_counter() - started,
    }


def evaluate(model, cfg: ProbeConfig) -> dict:
    """Accuracy of the plain HF forward and of ``BlockEngine`` under each policy, on the same prompts."""
    rng = np.random.default_rng(cfg.seed + 2)
    prompts, targets = zip(*[make_prompt(rng, cfg) for _ in range(cfg.eval_prompts)], strict=False)
    targets = np.array(targets)
    labels = [list(range(LABEL0, LABEL0 + cfg.candidates))] * len(prompts)
    scores = score_full(model, [p.input_ids for p in prompts], labels, pad_id=0)
    out = {"hf_forward": {"accuracy": _accuracy(scores, targets), "recompute_fraction": 1.0}}
    with open_store("memory://", "probe") as store:
        engine = BlockEngine(
            Ranker(model, None, None, "probe"), store, backend="torch", guard=False
        )  # measures reuse itself
        for policy in POLICIES:
            chunks = [list(prompts[start : start + 50]) for start in range(0, len(prompts), 50)]
            scored = [
                s
                for chunk in chunks
                for s in engine.score(chunk, labels[: len(chunk)], policy=parse_policy(policy))
            ]
            out[policy] = {
                "accuracy": _accuracy([s.logits for s in scored], targets),
                "recompute_fraction": float(np.mean([s.cache.recomputed_fraction for s in scored])),
            }
        engine.close()
    return out


def _accuracy(scores, targets: np.ndarray) -> float:
    return float(
        np.mean([int(torch.as_tensor(s).argmax()) == t for s, t in zip(scores, targets, strict=False)])
    )


def run(cfg: ProbeConfig, progress: bool = True) -> dict:
    report = {"config": asdict(cfg), "chance": 1 / cfg.candidates, "models": {}}
    for name, block_fraction in MODELS.items():
        model, summary = train(cfg, block_fraction, progress)
        report["models"][name] = {**summary, "results": evaluate(model, cfg)}
    return report


def markdown(report: dict) -> str:
    names = list(report["models"])
    rows = [
        f"| scored with | recompute | {' | '.join(f'{n} accuracy' for n in names)} |",
        "|---|---|" + "---|" * len(names),
    ]
    for policy in report["models"][names[0]]["results"]:
        cells = [f"{report['models'][n]['results'][policy]['accuracy']:.3f}" for n in names]
        frac = report["models"][names[0]]["results"][policy]["recompute_fraction"]
        rows.append(f"| {policy} | {frac:.3f} | {' | '.join(cells)} |")
    losses = ", ".join(
        f"{n}: label CE {m['final_loss']:.3f}, {m['train_seconds']:.0f} s"
        for n, m in report["models"].items()
    )
    return "\n".join(rows) + f"\n\nchance {report['chance']:.3f}; {losses}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="block_probe", description=__doc__.split("\n")[0])
    defaults = ProbeConfig()
    for field in ("candidates", "item_tokens", "hidden", "layers", "steps", "eval_prompts", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="bench_out/block_probe.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ProbeConfig(
        **{
            f: getattr(args, f)
            for f in ("candidates", "item_tokens", "hidden", "layers", "steps", "eval_prompts", "seed", "lr")
        }
    )
    report = run(cfg)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

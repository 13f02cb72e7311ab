"""Item-LM rankers: a sequence model over the user block, compiled into the label lookup.

Gradient descent does not find a ranker's binding circuit (label -> item -> query) from scratch
on CPU budgets (README, "What the ranker learns"), while an item-level language model over the
same histories beats the retriever on MovieLens-1M. This recipe therefore

1. trains a small Llama as a language model over the prompt's own user blocks (next item after
   every history line and after ``NEXT_MARKER``, which ends the block; :func:`train_item_lm`);
2. fits the position prior and the weight of the item LM's score with the verbalizer objective
   on the same cross-fitted examples ``rcllm train`` uses (K + 1 numbers; :func:`fit_readout`);
3. *compiles* the label lookup around the trained layers as two more Llama layers with
   constructed weights (:func:`compile_ranker`). Extra hidden dimensions (:class:`Layout`) carry it:

   - layer L, attention: every token after the marker copies the marker's next-item prediction
     (a rank-R projection: PRED); each candidate's item token copies its label from two tokens
     back (LAB), at a magnitude that dominates its norm, so RMSNorm scales every candidate alike;
     every other token rests on the system block's first token (a sink that cached blocks see too).
   - layer L, MLP: SCORE = PRED . KEY, the item LM's logit of the token's own item (KEY, the item's
     rank-R output embedding, is part of its input embedding), exact by silu(z) - silu(-z) = z.
   - layer L+1, attention: the last token attends to the candidates' item tokens with score
     ``tau * SCORE + b[label] + gate`` and copies their labels (OUT); ``gate``, carried by LAB, is
     large enough that no other token competes. The label tokens' output rows read OUT.

The result is a plain ``LlamaForCausalLM`` on which every serving mode runs; the label logits
rank candidates by ``tau * logit + b[label]`` (logits proportional to its softmax).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from rcllm_sdk.model.ranker import Ranker, save_ranker
from rcllm_sdk.model.scoring import at_last_token, pad_batch, score_full
from rcllm_sdk.model.tokenizer import label_token_ids, train_tokenizer
from rcllm_sdk.prompt import ItemInfo, PromptTemplate, item_token
from rcllm_sdk.prompt.template import NEXT_MARKER
from rcllm_sdk.retrieval import Retriever

from .examples import BlockEncoder, build_examples
from .positional import positional_weights
from .train import lr_factor, take_step, tokenizer_corpus


def item_lm_template(
    max_history: int = 20, item_text_words: int = 0, relation_markers: bool = False
) -> PromptTemplate:
    """Compact prompts (one item token per line; candidates' blocks may add description words) whose
    user block ends with the marker; content item LMs also mark each line's relation to the one before."""
    return PromptTemplate(
        titles=False,
        categories=False,
        history_footer=f"{NEXT_MARKER}\n",
        max_history=max_history,
        item_text_words=item_text_words,
        relation_markers=relation_markers,
    )


ROPE_THETA = (
    1e6  # the compiled layers match content through the slowest rotary pair, nearly still at this base
)
ITEM_LM_SHAPES = {  # size preset -> (hidden, layers, heads, intermediate); heads of 32 dimensions
    "micro": (64, 2, 2, 128),
    "small": (128, 2, 4, 256),
    "base": (256, 4, 8, 512),
}


# ---------------------------------------------------------------- 1. the item LM over user blocks


class UserBlockWindows:
    """Token ids of training windows: system block, user block over ``items[s:s+n]`` ending with the
    marker, then the next item's token (the marker's target). Item lines are encoded once each."""

    def __init__(self, catalog: dict[int, ItemInfo], template: PromptTemplate, tokenizer):
        self.catalog, self.template, self.tokenizer = catalog, template, tokenizer
        ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self._head = ids(template.system) + ids(template.history_header)
        self._footer = ids(template.history_footer)
        self._lines = {i: ids(template.item_line(i, c.title, c.category)) for i, c in catalog.items()}
        self.item_token_ids = torch.tensor([tokenizer.convert_tokens_to_ids(item_token(i)) for i in catalog])
        self.marker_id = tokenizer.convert_tokens_to_ids(NEXT_MARKER)
        if self._footer[:1] != [self.marker_id]:
            raise ValueError(f"the template's history footer must start with {NEXT_MARKER}")

    def encode(self, items: list[int], next_item: int) -> list[int]:
        """``system + header + lines + [marker, <next item>]``."""
        lines = [t for i in items for t in self._lines[i]]
        return self._head + lines + [self.marker_id, self._lines[next_item][0]]


def item_lm_config(tokenizer, size: str, tie: bool) -> LlamaConfig:
    """The item LM's shape (``ITEM_LM_SHAPES[size]``) over ``tokenizer``'s vocabulary."""
    hidden, layers, heads, intermediate = ITEM_LM_SHAPES[size]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rope_theta=ROPE_THETA,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie,
    )


VALIDATION_SHARE = 20  # with early stopping, a seeded random 1/20 of the training sequences is held out
MAX_VALIDATION_WINDOWS = 512


def train_item_lm(
    sequences: list[list[int]], windows: UserBlockWindows, config, progress: bool = True
) -> tuple[LlamaForCausalLM, list[float], dict]:
    """A Llama (shape ``ITEM_LM_SHAPES[config.size]``) trained on next-item prediction inside user
    blocks: at every history line's end and at the marker, cross-entropy over the item tokens only
    (text tokens are never targets). ``config`` is a ``TrainConfig``: ``steps`` x ``batch_size``
    windows of ``item_lm_window`` consecutive items.

    Early stopping (``config.item_lm_patience`` > 0): a seeded random twentieth of the sequences is held
    out; their last windows are scored every ``steps // 20`` steps (at least 25), training stops after
    ``patience`` checks without a better validation loss, and the best weights are returned. Item LMs
    memorise beyond a few passes over the data (README, "Round 8"). Returns ``(model, losses, record)``.
    """
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(item_lm_config(windows.tokenizer, config.size, tie=True))
    train, validation = validation_split(sequences, windows.encode, config)
    loss_of = _ItemLoss(windows)
    rng = np.random.default_rng(config.seed)
    return fit_item_lm(
        model,
        lambda: loss_of(model, sample_windows(train, windows.encode, config, rng)),
        (lambda: loss_of.evaluate(model, validation)) if validation else None,
        config,
        "item LM",
        progress,
    )


def fit_item_lm(
    model, next_loss, validation_loss, config, name: str, progress: bool
) -> tuple[torch.nn.Module, list[float], dict]:
    """``config.steps`` optimiser steps on ``next_loss()`` (AdamW, warm-up and cosine schedule).
    With ``validation_loss`` (None: no validation), early stopping: checked every ``steps // 20``
    steps (at least 25), stop after ``config.item_lm_patience`` checks without a lower loss and
    return the best weights. Returns ``(model, losses, record)``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    losses, stopper = [], _EarlyStopping(config.item_lm_patience, max(25, config.steps // 20))
    model.train()
    bar = tqdm(range(config.steps), desc=f"train {name}", disable=not progress, unit="step")
    for step in bar:
        take_step(model, optimizer, schedule, next_loss(), losses, bar)
        if validation_loss and stopper.due(step + 1, config.steps):
            if stopper.record(model, validation_loss(), step + 1):
                break
    bar.close()
    if progress and validation_loss:
        print(
            f"{name}: {step + 1} steps run; best validation loss {stopper.best:.4f} at step {stopper.best_step}"
        )
    return stopper.restore(model).eval(), losses, stopper.summary(step + 1)


def sample_windows(sequences: list[list], encode, config, rng) -> list[list[int]]:
    """``config.batch_size`` random windows of at most ``config.item_lm_window`` consecutive items and
    the item after them, as ``encode(items, next_item)`` writes them."""
    batch = []
    for n in rng.integers(0, len(sequences), config.batch_size):
        seq = sequences[n]
        length = min(config.item_lm_window, len(seq) - 1)
        start = int(rng.integers(0, len(seq) - length))
        batch.append(encode(seq[start : start + length], seq[start + length]))
    return batch


def validation_split(sequences: list[list], encode, config) -> tuple[list, list]:
    """``(training sequences, validation windows)`` over the sequences of two or more items: a seeded
    random ``1 / VALIDATION_SHARE`` of them held out, their last windows written by ``encode(items,
    next_item)``. No validation without early stopping or with fewer than ``VALIDATION_SHARE`` sequences."""
    usable = [s for s in sequences if len(s) >= 2]
    if not usable:
        raise ValueError("no training sequence has two or more items")
    if config.item_lm_patience <= 0 or len(usable) < VALIDATION_SHARE:
        return usable, []
    held = set(
        np.random.default_rng(config.seed)
        .permutation(len(usable))[: len(usable) // VALIDATION_SHARE]
        .tolist()
    )
    last_windows = [
        encode(s[-config.item_lm_window - 1 : -1], s[-1]) for n, s in enumerate(usable) if n in held
    ]
    return [s for n, s in enumerate(usable) if n not in held], last_windows[:MAX_VALIDATION_WINDOWS]


@torch.no_grad()
def mean_loss(model, loss_of_batch, windows: list[list[int]], batch: int = 128) -> float:
    """Window-weighted mean of ``loss_of_batch`` over ``windows``, in eval mode."""
    model.eval()
    total = sum(
        float(loss_of_batch(windows[n : n + batch])) * len(windows[n : n + batch])
        for n in range(0, len(windows), batch)
    )
    model.train()
    return total / len(windows)


class _ItemLoss:
    """Cross-entropy over item tokens at the positions whose next token is an item."""

    def __init__(self, windows: UserBlockWindows):
        tok = windows.tokenizer
        self.pad_id, self.item_ids = tok.pad_token_id, windows.item_token_ids
        self.is_item = torch.zeros(len(tok), dtype=torch.bool)
        self.is_item[self.item_ids] = True
        self.column = torch.full((len(tok),), -1, dtype=torch.long)
        self.column[self.item_ids] = torch.arange(len(self.item_ids))

    def __call__(self, model, batch: list[list[int]]) -> torch.Tensor:
        ids, mask, _ = pad_batch(batch, self.pad_id)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        targets = ids[:, 1:]
        rows, cols = torch.nonzero(self.is_item[targets] & (mask[:, 1:] > 0), as_tuple=True)
        logits = hidden[rows, cols] @ model.lm_head.weight[self.item_ids].T  # item tokens only
        return torch.nn.functional.cross_entropy(logits, self.column[targets[rows, cols]])

    def evaluate(self, model, windows: list[list[int]], batch: int = 128) -> float:
        return mean_loss(model, lambda part: self(model, part), windows, batch)


class _EarlyStopping:
    """Keeps the weights with the lowest validation loss; says stop after ``patience`` checks without one."""

    def __init__(self, patience: int, every: int):
        self.patience, self.every = patience, every
        self.best, self.best_step, self.best_state, self.since_best, self.history = math.inf, 0, None, 0, []

    def due(self, step: int, last: int) -> bool:
        return step % self.every == 0 or step == last

    def record(self, model, loss: float, step: int) -> bool:
        self.history.append((step, round(loss, 4)))
        if loss < self.best:
            self.best, self.best_step, self.since_best = loss, step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
        return self.since_best >= self.patience

    def restore(self, model):
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
        return model

    def summary(self, steps_run: int) -> dict:
        if not self.history:
            return {"item_lm_steps_run": steps_run}
        return {
            "item_lm_steps_run": steps_run,
            "item_lm_best_step": self.best_step,
            "item_lm_validation_loss": round(self.best, 4),
            "item_lm_validation_history": self.history,
        }


@torch.no_grad()
def marker_predictions(
    model: LlamaForCausalLM, prompts: list[list[int]], marker_id: int, batch: int = 128
) -> torch.Tensor:
    """Final-norm hidden state at the marker of each prompt: ``[N, hidden]`` (its item logits are
    this times the output embeddings)."""
    out = []
    for n in range(0, len(prompts), batch):
        ids, mask, lengths = pad_batch([p[: p.index(marker_id) + 1] for p in prompts[n : n + batch]], 0)
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.append(at_last_token(hidden, lengths))
    return torch.cat(out)


# ---------------------------------------------------------------- 2. the readout (K + 1 weights)


def score_basis(model: LlamaForCausalLM, item_token_ids: torch.Tensor, rank: int) -> torch.Tensor:
    """``[hidden, rank]`` orthonormal basis of the item output embeddings' top singular directions:
    the item LM's logits restricted to it are what the compiled lookup carries."""
    out = model.lm_head.weight[item_token_ids].detach().double()
    return torch.linalg.svd(out, full_matrices=False)[2][:rank].T.float()


def candidate_scores(
    model, prompts: list[list[int]], candidate_tokens: list[list[int]], marker_id: int, basis: torch.Tensor
) -> torch.Tensor:
    """``[N, K]`` rank-R item-LM logits of each prompt's candidates, read at the marker."""
    return _scores_of((marker_predictions(model, prompts, marker_id) @ basis), model, candidate_tokens, basis)


def _scores_of(
    predictions: torch.Tensor, model, candidate_tokens: list[list[int]], basis: torch.Tensor
) -> torch.Tensor:
    """``[N, K]`` scores from projected marker predictions ``[N, R]``."""
    keys = model.lm_head.weight.detach()[torch.tensor(candidate_tokens)] @ basis  # [N, K, R]
    return torch.einsum("nr,nkr->nk", predictions, keys)


def fit_readout(scores: torch.Tensor, targets: torch.Tensor, steps: int = 500) -> tuple[float, np.ndarray]:
    """``(tau, b)``: a softmax over candidates with logits ``tau * score + b[position]`` fitted by
    cross-entropy on training examples (the verbalizer objective with K + 1 free numbers)."""
    tau = torch.zeros((), requires_grad=True)
    bias = torch.zeros(scores.shape[1], requires_grad=True)
    optimizer = torch.optim.Adam([tau, bias], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(tau * scores + bias, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(tau.detach()), (bias - bias.mean()).detach().numpy()


# ---------------------------------------------------------------- 3. compiling the lookup


@dataclass(slots=True, frozen=True)
class Layout:
    """Hidden dimensions of a compiled ranker: the item LM's ``hidden`` first, then the lookup's."""

    hidden: int
    k: int
    rank: int
    multiple: int = 1  # the width is rounded up to a multiple of this (Llama needs heads | hidden)

    @property
    def const(self) -> int:  # small, in every token's embedding: queries of the compiled heads
        return self.hidden

    @property
    def mark(self) -> int:  # small, in the marker's embedding: what the prediction gather finds
        return self.hidden + 1

    @property
    def label_flag(self) -> int:  # large, in label tokens' embeddings: what the label binding finds
        return self.hidden + 2

    @property
    def score(self) -> int:  # the item LM's logit of a candidate's item, at its item token
        return self.hidden + 3

    @property
    def item_flag(self) -> int:  # small, in item tokens' embeddings: queries of the label binding
        return self.hidden + 4

    @property
    def sink(self) -> int:  # small, in the system block's first token: where unbound tokens rest
        return self.hidden + 5

    def _span(self, n: int, size: int) -> slice:
        start = self.hidden + 6 + n * self.k
        return slice(start, start + size)

    @property
    def label_src(self) -> slice:  # one-hot label identity in label tokens' embeddings
        return self._span(0, self.k)

    @property
    def label(self) -> slice:  # the bound label at a candidate's item token (dominates its norm)
        return self._span(1, self.k)

    @property
    def out(self) -> slice:  # the label distribution at the last token, read by the label logits
        return self._span(2, self.k)

    @property
    def key(self) -> slice:  # the item's rank-R output embedding, in item tokens' embeddings
        start = self.hidden + 6 + 3 * self.k
        return slice(start, start + self.rank)

    @property
    def pred(self) -> slice:  # the marker's rank-R prediction, copied to every later token
        start = self.hidden + 6 + 3 * self.k + self.rank
        return slice(start, start + self.rank)

    @property
    def width(self) -> int:
        return math.ceil((self.hidden + 6 + 3 * self.k + 2 * self.rank) / self.multiple) * self.multiple


GATHER_SCORE = 30.0  # attention score of the marker over other tokens, at the least favourable norms
BIND_MARGIN = 30.0  # positional score margin of the label binding (two tokens back vs elsewhere)
SINK = 30.0  # score of the system block's first token in the binding head: where unbound tokens rest
ROBUST = 10.0  # the gather and binding scores hold for residual norms up to this many times the calibration's
SMALL = (
    1e-3  # size of the extra embedding features relative to an item embedding (the item LM barely sees them)
)
SPAN = 100.0  # how far the bound label dominates everything else in a candidate's residual


@torch.no_grad()
def compile_ranker(
    base: LlamaForCausalLM,
    tokenizer,
    template: PromptTemplate,
    tau: float,
    bias: np.ndarray,
    basis: torch.Tensor,
    item_token_ids: torch.Tensor,
    calibration: list[list[int]],
) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` whose label logits at a prompt's last token rank the candidates by
    ``tau * s + bias[label]``, ``s`` the item LM's rank-R logit of the candidate after the user
    block (module docstring). ``calibration`` prompts (rendered with ``template``) set the scales
    of the compiled layers from the item LM's actual hidden-state norms."""
    k, rank = len(bias), basis.shape[1]
    cfg = base.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gather_heads = math.ceil(rank / head_dim)
    if k > head_dim:
        raise ValueError(f"{k} candidates do not fit one head of {head_dim} dimensions")
    labels = label_token_ids(tokenizer, template.labels[:k])
    marker = tokenizer.convert_tokens_to_ids(NEXT_MARKER)
    heads = max(cfg.num_attention_heads, gather_heads + 1)
    layout = Layout(cfg.hidden_size, k, rank, multiple=heads)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=layout.width,
            intermediate_size=max(cfg.intermediate_size, 2 * rank),
            num_hidden_layers=cfg.num_hidden_layers + 2,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=_rope_theta(cfg),
            rms_norm_eps=cfg.rms_norm_eps
            * cfg.hidden_size
            / layout.width,  # the same eps per item-LM dimension
            pad_token_id=cfg.pad_token_id,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            tie_word_embeddings=False,
        )
    )
    for p in model.parameters():
        p.zero_()
    sink = calibration[0][
        0
    ]  # every prompt, and every block's canonical context, starts with the system block
    key_scale = _copy_item_lm(base, model, layout, labels, marker, sink, basis, item_token_ids)
    norms = _residual_norms(model, calibration, cfg.num_hidden_layers, marker, labels, item_token_ids)
    _set_gather(model, base, layout, basis, norms, gather_heads, head_dim)
    predictions = marker_predictions(base, calibration, marker) @ basis  # one item-LM pass for both uses
    bound = _set_binding(model, layout, norms, gather_heads, head_dim, float(predictions.norm(dim=1).max()))
    s = _scores_of(predictions, base, [_candidate_tokens(p, labels) for p in calibration], basis)
    score_unit = float(norms["candidate"].max()) / float(s.abs().max())  # SCORE = score_unit * s
    _set_product(model, layout, bound, score_unit, key_scale)
    final = _residual_norms(model, calibration, cfg.num_hidden_layers + 1, marker, labels, item_token_ids)[
        "final"
    ]
    _set_lookup(model, layout, tau, bias, bound, score_unit, float(final.median()), head_dim, labels)
    return model.eval()


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _copy_item_lm(
    base,
    model,
    layout: Layout,
    labels: list[int],
    marker: int,
    sink: int,
    basis: torch.Tensor,
    item_token_ids: torch.Tensor,
) -> float:
    """The item LM's layers, embeddings and head in the first ``hidden`` dimensions, with RMSNorm
    weights rescaled so that its hidden states are unchanged by the (small) extra dimensions;
    embedding extras: CONST everywhere, MARK on the marker, SINK on the system block's first token,
    KEY and ITEM_FLAG on item tokens, large CONST, LABEL_FLAG and one-hot LABEL_SRC on label tokens. Returns the scale of KEY (KEY = scale * out_emb @ basis)."""
    h, width = layout.hidden, layout.width
    rescale = math.sqrt(h / width)
    emb, base_emb = model.model.embed_tokens.weight, base.model.embed_tokens.weight
    emb[:, :h] = base_emb
    typical = float(base_emb[item_token_ids].norm(dim=1).median())
    small = SMALL * typical
    emb[:, layout.const] = small
    emb[marker, layout.mark] = small
    emb[sink, layout.sink] = small
    keys = base.lm_head.weight[item_token_ids] @ basis
    key_scale = small / float(keys.norm(dim=1).median())
    emb[item_token_ids, layout.key] = key_scale * keys
    emb[item_token_ids, layout.item_flag] = small
    big = 1e4 * typical  # label tokens come after the marker: their item-LM state is never read
    emb[labels, :h] = 0
    emb[labels, layout.const] = big  # so that label tokens, too, rest on the sink in the binding head
    emb[labels, layout.label_flag] = big
    for j, token in enumerate(labels):
        emb[token, layout.label_src.start + j] = big
    for src, dst in zip(base.model.layers, model.model.layers, strict=False):
        _copy_layer(src, dst, h, rescale)
    model.model.norm.weight[:h] = base.model.norm.weight * rescale
    model.model.norm.weight[layout.out] = 1.0
    model.lm_head.weight[:, :h] = base.lm_head.weight
    model.lm_head.weight[labels, :h] = 0
    return key_scale


def _copy_layer(src, dst, h: int, rescale: float) -> None:
    a, b = src.self_attn, dst.self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        w = getattr(a, name).weight
        getattr(b, name).weight[: w.shape[0], :h] = w
    b.o_proj.weight[:h, : a.o_proj.weight.shape[1]] = a.o_proj.weight
    m, n = src.mlp, dst.mlp
    inner = m.gate_proj.weight.shape[0]
    n.gate_proj.weight[:inner, :h] = m.gate_proj.weight
    n.up_proj.weight[:inner, :h] = m.up_proj.weight
    n.down_proj.weight[:h, :inner] = m.down_proj.weight
    dst.input_layernorm.weight[:h] = src.input_layernorm.weight * rescale
    dst.post_attention_layernorm.weight[:h] = src.post_attention_layernorm.weight * rescale


def _candidate_tokens(prompt: list[int], labels: list[int]) -> list[int]:
    """The item token after each label token (two tokens on) in a rendered prompt."""
    positions = [p for p, t in enumerate(prompt) if t in labels]
    return [prompt[p + 2] for p in positions[: len(labels)]]


def _residual_norms(
    model, prompts: list[list[int]], layer: int, marker: int, labels: list[int], item_token_ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Norms of the residual stream entering ``layer`` at markers, candidates' item tokens, label
    tokens and last tokens of ``prompts`` (a forward with the compiled layers as they are now)."""
    captured = []
    hook = model.model.layers[layer].input_layernorm.register_forward_pre_hook(
        lambda _, x: captured.append(x[0])
    )
    try:
        for n in range(0, len(prompts), 64):
            ids, mask, _ = pad_batch(prompts[n : n + 64], 0)
            model.model(input_ids=ids, attention_mask=mask)
    finally:
        hook.remove()
    items = set(item_token_ids.tolist())
    found = {"marker": [], "sink": [], "candidate": [], "label": [], "final": []}
    for n, prompt in enumerate(prompts):
        x = captured[n // 64][n % 64].norm(dim=-1)
        cut = prompt.index(marker)
        found["marker"].append(x[cut])
        found["sink"].append(x[0])
        found["final"].append(x[len(prompt) - 1])
        found["label"] += [x[p] for p, t in enumerate(prompt) if t in labels]
        found["candidate"] += [x[p] for p, t in enumerate(prompt) if p > cut and t in items]
    return {name: torch.stack(v) for name, v in found.items()}


def _set_gather(
    model, base, layout: Layout, basis: torch.Tensor, norms: dict, gather_heads: int, head_dim: int
) -> None:
    """Layer L's first heads: every token attends to the marker (CONST query, MARK key, in the
    slowest rotary pair, so distance does not matter) and copies ``basis^T norm(x_marker)`` into
    PRED — the item LM's final-norm state, projected."""
    layer, width = model.model.layers[len(base.model.layers)], layout.width
    attn, slow = layer.self_attn, head_dim // 2 - 1
    layer.input_layernorm.weight[:] = 1.0
    emb = model.model.embed_tokens.weight
    scaled = lambda value, norm: value * math.sqrt(width) / norm  # noqa: E731  RMSNorm of one coordinate
    largest = ROBUST * float(norms["final"].max().clamp(min=norms["candidate"].max()))
    query = scaled(float(emb[0, layout.const]), largest)
    key = scaled(float(emb[:, layout.mark].max()), float(norms["marker"].max()))
    gain = math.sqrt(GATHER_SCORE * math.sqrt(head_dim) / (query * key))
    read = basis.T * base.model.norm.weight[None] * math.sqrt(layout.hidden / width)  # [R, hidden]
    for head in range(gather_heads):
        attn.q_proj.weight[head * head_dim + slow, layout.const] = gain
        attn.k_proj.weight[head * head_dim + slow, layout.mark] = gain
        rows = range(head * head_dim, min((head + 1) * head_dim, layout.rank))
        for t, r in enumerate(rows):
            attn.v_proj.weight[head * head_dim + t, : layout.hidden] = read[r]
            attn.o_proj.weight[layout.pred.start + r, head * head_dim + t] = 1.0


def _set_binding(model, layout: Layout, norms: dict, head: int, head_dim: int, pred_norm: float) -> float:
    """Layer L's next head binds each candidate's item token to its label. Every token rests on
    the system block's first token (CONST query, SINK key, slowest rotary pair, score ``SINK``) — it
    is there in every prompt and in every cached block's canonical context; item
    tokens also query label tokens by position (ITEM_FLAG query, LABEL_FLAG key, the other rotary
    pairs fitted by ``positional.positional_weights``): ``SINK + BIND_MARGIN`` two tokens back,
    ``-BIND_MARGIN`` elsewhere. A positional score alone cannot tell two tokens back from three
    (rotary frequencies are at most one radian per token), so tokens that are not items must not
    query by position at all. The head copies the one-hot label into LABEL at a magnitude ``SPAN``
    times anything else in a candidate's residual; returns that magnitude."""
    layer = model.model.layers[len(model.model.layers) - 2]
    attn, half, width = layer.self_attn, head_dim // 2, layout.width
    emb = model.model.embed_tokens.weight
    scaled = lambda value, norm: value * math.sqrt(width) / norm  # noqa: E731  RMSNorm of one coordinate
    item = ROBUST * float(norms["candidate"].median())  # scores as stated for norms this large, larger below
    flag = scaled(float(emb[:, layout.item_flag].max()), item)
    label_key = scaled(float(emb[:, layout.label_flag].max()), float(norms["label"].median()))
    sink_key = scaled(float(emb[:, layout.sink].max()), float(norms["sink"].median()))
    const = scaled(float(emb[0, layout.const]), item)
    freqs = model.model.rotary_emb.inv_freq.float().cpu()[: half - 1]  # the slowest pair is the sink's
    with torch.enable_grad():
        weights = positional_weights(freqs, 2, BIND_MARGIN, 2048)
    # Scores in units of BIND_MARGIN, scaled so the label gets SINK + BIND_MARGIN and other labels
    # at most -(SINK + BIND_MARGIN): the label beats the sink, the sink beats every other label.
    amplitude = (weights.abs() * math.sqrt(head_dim) * (1 + SINK / BIND_MARGIN)).sqrt()
    phase = -2 * freqs
    base, slow = head * head_dim, head * head_dim + half - 1
    attn.q_proj.weight[base:slow, layout.item_flag] = weights.sign() * amplitude * torch.cos(phase) / flag
    attn.q_proj.weight[base + half : base + head_dim - 1, layout.item_flag] = (
        weights.sign() * amplitude * torch.sin(phase) / flag
    )
    attn.k_proj.weight[base:slow, layout.label_flag] = amplitude / label_key
    gain = math.sqrt(SINK * math.sqrt(head_dim) / (const * sink_key))
    attn.q_proj.weight[slow, layout.const] = gain
    attn.k_proj.weight[slow, layout.sink] = gain
    bound = SPAN * (float(norms["candidate"].max()) + pred_norm)
    label_src_value = scaled(float(emb[:, layout.label_src].max()), float(norms["label"].median()))
    for j in range(layout.k):
        attn.v_proj.weight[base + j, layout.label_src.start + j] = 1.0
        attn.o_proj.weight[layout.label.start + j, base + j] = bound / label_src_value
    return bound


def _set_product(model, layout: Layout, bound: float, score_unit: float, key_scale: float) -> None:
    """Layer L's MLP: SCORE = score_unit * PRED . KEY / key_scale (the item LM's logit of the
    token's item) at candidates, whose norm is ``bound``; two SwiGLU neurons per rank, exact by
    silu(a) b - silu(-a) b = a b."""
    layer = model.model.layers[len(model.model.layers) - 2]
    layer.post_attention_layernorm.weight[:] = 1.0
    mlp = layer.mlp
    scale = score_unit * bound**2 / (layout.width * key_scale)  # undoes RMSNorm's 1/bound on both factors
    for r in range(layout.rank):
        for sign, neuron in ((1.0, 2 * r), (-1.0, 2 * r + 1)):
            mlp.gate_proj.weight[neuron, layout.pred.start + r] = sign
            mlp.up_proj.weight[neuron, layout.key.start + r] = sign
            mlp.down_proj.weight[layout.score, neuron] = scale


def _set_lookup(
    model,
    layout: Layout,
    tau: float,
    bias: np.ndarray,
    bound: float,
    score_unit: float,
    final_norm: float,
    head_dim: int,
    labels: list[int],
) -> None:
    """Layer L+1: the last token attends to candidates with score ``tau * s + bias[label] + gate``
    and copies their one-hot labels into OUT; the label tokens' logits read OUT. A candidate's
    LABEL dominates its norm, so its normalised LABEL is ``unit`` whatever else it holds; other
    tokens have (next to) no LABEL, and a normalised SCORE is at most ``unit`` anywhere, so
    ``gate`` exceeds any score a non-candidate can reach."""
    layer = model.model.layers[-1]
    layer.input_layernorm.weight[:] = 1.0
    attn, slow = layer.self_attn, head_dim // 2 - 1
    unit = math.sqrt(layout.width)  # a coordinate's RMSNorm when it dominates its residual
    query = float(model.model.embed_tokens.weight[0, layout.const]) * unit / final_norm
    attn.q_proj.weight[slow, layout.const] = (
        math.sqrt(head_dim) / query
    )  # score = key at a typical last token
    gate = abs(tau) * bound / score_unit + float(np.abs(bias).max()) + 50.0
    attn.k_proj.weight[slow, layout.score] = tau * bound / (score_unit * unit)
    for j in range(layout.k):
        attn.k_proj.weight[slow, layout.label.start + j] = (gate + float(bias[j])) / unit
        attn.v_proj.weight[j, layout.label.start + j] = 1.0
        attn.o_proj.weight[layout.out.start + j, j] = 1.0
    for j, token in enumerate(labels):
        model.lm_head.weight[token, layout.out.start + j] = 10.0 * final_norm / (unit * unit)


# ---------------------------------------------------------------- the recipe


def train_item_lm_ranker(
    groups: list[tuple[list[list[int]], Retriever]],
    catalog: dict[int, ItemInfo],
    out_dir: str | Path,
    config,
    template: PromptTemplate | None = None,
    progress: bool = True,
) -> tuple[Ranker, dict]:
    """``rcllm train --recipe item-lm``: train the item LM on every training sequence, fit the readout
    on the cross-fitted examples, compile, check the compiled model against the readout on held-out
    examples, and save (HF format, like any ranker). Returns the ranker and a summary."""
    started = time.perf_counter()
    content = config.item_features == "content"
    template = template or item_lm_template(item_text_words=config.item_text_words, relation_markers=content)
    if (
        template.relation_markers != content
    ):  # the id item LM's windows carry no markers; the content one needs them
        raise ValueError("relation markers in the template go with item_features='content', and only with it")
    tokenizer = train_tokenizer(
        tokenizer_corpus(catalog, template), catalog.keys(), template, config.vocab_size
    )
    windows = UserBlockWindows(catalog, template, tokenizer)
    _check_labels_unused(windows, tokenizer, template, config.candidates)
    sequences = [seq for group, _ in groups for seq in group]
    if content:
        base, losses, stopping = _train_content_item_lm(sequences, catalog, windows, config, progress)
    else:
        base, losses, stopping = train_item_lm(sequences, windows, config, progress)
    examples, stats = build_examples(
        groups, config.candidates, max_examples=config.max_examples, seed=config.seed
    )
    examples = [e for e in examples if len(e.candidates) == config.candidates]  # the readout has K positions
    if len(examples) < 2:
        raise ValueError(
            "fewer than two training examples: the retriever never ranked a true next item in its top-K"
        )
    encoder = BlockEncoder(catalog, template, tokenizer)
    prompts = [encoder.encode(e)[0] for e in examples]
    labels = label_token_ids(tokenizer, template.labels[: config.candidates])
    candidates = [[tokenizer.convert_tokens_to_ids(item_token(i)) for i in e.candidates] for e in examples]
    basis = score_basis(base, windows.item_token_ids, config.item_lm_rank or base.config.hidden_size)
    scores = candidate_scores(base, prompts, candidates, windows.marker_id, basis)
    held_out = max(1, min(256, len(examples) // 10))  # checks the compiled model; not used to fit
    targets = torch.tensor([e.target for e in examples])
    tau, bias = fit_readout(scores[held_out:], targets[held_out:])
    readout_loss = float(
        torch.nn.functional.cross_entropy(tau * scores[held_out:] + torch.tensor(bias), targets[held_out:])
    )
    model = compile_ranker(
        base,
        tokenizer,
        template,
        tau,
        bias,
        basis,
        windows.item_token_ids,
        prompts[held_out : held_out + 256],
    )
    agreement = compiled_agreement(
        model,
        prompts[:held_out],
        tau * scores[:held_out] + torch.tensor(bias),
        labels,
        tokenizer.pad_token_id,
    )
    if agreement < 0.95:
        warnings.warn(
            f"the compiled ranker's top candidate matches the readout's on only {agreement:.0%} of "
            "held-out examples; its scales may not suit this item LM (please report it)",
            stacklevel=2,
        )
    ranker = Ranker(model, tokenizer, template, fingerprint="unsaved")
    summary = {
        **stats,
        "final_loss": readout_loss,
        "item_lm_final_loss": float(np.mean(losses[-20:])),
        "readout_tau": tau,
        "readout_bias": [round(float(b), 4) for b in bias],
        "compiled_top1_agreement": agreement,
        "train_seconds": time.perf_counter() - started,
        **stopping,
        "parameters": sum(p.numel() for p in model.parameters()),
        **{
            k: v
            for k, v in asdict(config).items()
            if k not in ("block_aware", "block_aware_fraction", "history_lm_weight", "shuffle_candidates")
        },
    }
    save_ranker(ranker, out_dir, training=summary)
    return ranker, summary


def _train_content_item_lm(
    sequences: list[list[int]],
    catalog: dict[int, ItemInfo],
    windows: UserBlockWindows,
    config,
    progress: bool,
) -> tuple[LlamaForCausalLM, list[float], dict]:
    """``--item-features content``: train on the target catalogue (and ``config.pretrain_worlds``
    synthetic ones), then write the target's content embeddings into its item tokens' rows."""
    from .content_item_lm import Catalogue, ContentWindows, synthetic_catalogues, train_content_item_lm

    row = {item: n for n, item in enumerate(catalog)}  # the order of windows.item_token_ids
    target = Catalogue.from_sequences(list(catalog.values()), [[row[i] for i in s] for s in sequences])
    pretrain = synthetic_catalogues(config.pretrain_worlds)
    model, losses, record = train_content_item_lm(
        target,
        pretrain,
        ContentWindows(windows.template, windows.tokenizer),
        config,
        item_lm_config(windows.tokenizer, config.size, tie=False),
        progress,
    )
    return model.materialize(target, windows.item_token_ids).eval(), losses, record


def _check_labels_unused(windows: UserBlockWindows, tokenizer, template: PromptTemplate, k: int) -> None:
    """The compiled model rewrites the label tokens' embeddings; they must not occur in user blocks."""
    labels = set(label_token_ids(tokenizer, template.labels[:k]))
    used = {t for line in windows._lines.values() for t in line} | set(windows._head) | set(windows._footer)
    clash = labels & used
    if clash:
        raise ValueError(
            f"label tokens {tokenizer.convert_ids_to_tokens(sorted(clash))} occur in history lines; "
            "the item-lm recipe needs labels that appear nowhere else"
        )


@torch.no_grad()
def compiled_agreement(
    model, prompts: list[list[int]], expected: torch.Tensor, labels: list[int], pad_id: int
) -> float:
    """Share of ``prompts`` whose top label by the compiled model's logits is the top of ``expected``."""
    got = torch.stack(score_full(model, prompts, [labels] * len(prompts), pad_id))
    return float((got.argmax(1) == expected.argmax(1)).float().mean())

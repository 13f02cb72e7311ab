"""The readout: the item LM's next-item scores of each prompt's candidates (read at the marker,
restricted to the top singular directions of the item output embeddings) and the K + 1 numbers
(``tau``, a position prior) fitted on them with the verbalizer objective."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaForCausalLM

from rcllm_sdk.model.scoring import at_last_token, pad_batch


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

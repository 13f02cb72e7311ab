"""Full-prefill ranking: the plain HF forward, label-token logits at the last position.

This is the reference every faster mode is checked against.
"""

from __future__ import annotations

import torch


def pad_batch(
    sequences: list[list[int]], pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``ids [B, T]``, ``mask [B, T]`` and ``lengths [B]``. ``pad_id`` None (a
    tokenizer without a pad token) pads with id 0: the mask keeps padding out of attention."""
    lengths = torch.tensor([len(s) for s in sequences])
    fill = 0 if pad_id is None else pad_id
    ids = torch.full((len(sequences), int(lengths.max())), fill, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
    mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
    return ids, mask, lengths


def at_last_token(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` -> ``[B, H]``: each right-padded sequence's last real position."""
    return hidden[torch.arange(len(lengths)), lengths - 1]


def last_hidden(model, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Final-norm hidden state at each sequence's last real token: ``[B, hidden]``."""
    return at_last_token(model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)


def label_logits(model, hidden: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the label tokens only: ``[B, hidden] x [K] -> [B, K]`` (no full-vocab head)."""
    head = model.get_output_embeddings()
    logits = hidden @ head.weight[label_ids].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[label_ids]
    return logits


@torch.inference_mode()
def score_full(
    model, sequences: list[list[int]], label_ids: list[list[int]], pad_id: int | None
) -> list[torch.Tensor]:
    """Label scores of each prompt by one plain forward over the whole batch on the model's
    device; ``[K_b]`` per prompt (``pad_id`` None: see :func:`pad_batch`)."""
    device = next(model.parameters()).device
    ids, mask, lengths = (t.to(device) for t in pad_batch(sequences, pad_id))
    hidden = last_hidden(model, ids, mask, lengths)
    return [
        label_logits(model, hidden[b : b + 1], torch.tensor(lab, device=device))[0]
        for b, lab in enumerate(label_ids)
    ]

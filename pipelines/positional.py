"""Per-frequency RoPE weights whose attention score peaks at one relative distance.

Used by the item-LM recipe's compiled label lookup (a positional head that reads the token a
fixed number of places back).
"""

from __future__ import annotations

import torch

POSITIONAL_FIT_STEPS = 2000  # Adam steps of the hinge fit; the loss has flattened well before


def _cosines(freqs: torch.Tensor, offset: int, max_distance: int) -> torch.Tensor:
    distance = torch.arange(max_distance, dtype=torch.float32)
    return torch.cos((distance[None] - offset) * freqs[:, None])  # [n_freqs, max_distance]


def positional_weights(freqs: torch.Tensor, offset: int, margin: float, max_distance: int) -> torch.Tensor:
    """Signed per-frequency weights: squared hinge losses push the score at ``offset`` over
    ``margin`` and every other distance under ``-margin`` (not reachable exactly; the fit trades them)."""
    cosines = _cosines(freqs, offset, max_distance)
    weights = torch.zeros(len(freqs), requires_grad=True)
    optimiser = torch.optim.Adam([weights], lr=0.1)
    others = torch.ones(max_distance, dtype=torch.bool)
    others[offset] = False
    for _ in range(POSITIONAL_FIT_STEPS):
        score = weights @ cosines
        loss = torch.relu(score[others] + margin).pow(2).mean() + torch.relu(margin - score[offset]).pow(2)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return weights.detach()

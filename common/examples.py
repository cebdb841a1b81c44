"""Training examples built so that the privacy argument holds.

An example is a PAIR of one user's interactions (a, b), trained in both directions in one
example: loss = CE(b | context a) + CE(a | context b), both against the same negatives sampled
uniformly from the public catalogue. Two pairings:

- `disjoint`: each user's interactions, in time order, are paired (1st,2nd), (3rd,4th), ... ; an
  unpaired last interaction waits for a partner and is not trained on. Every interaction is in
  at most ONE example, and adding or removing one interaction adds or removes exactly one example
  when pairs are fixed when interactions arrive (the device stores the pair id with the
  interaction; see the federated client), so DP-SGD's add/remove-one-example guarantee is a
  guarantee for each interaction. This is what DP training uses.
- `consecutive`: every consecutive pair (i, i+1). Each interaction is in up to two examples and a
  removal re-links the chain, so it is only for non-private training.

Negatives are public randomness: they never depend on other examples (no in-batch negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.common.data.history import UserHistories

PAIRINGS = ("disjoint", "consecutive")


@dataclass(frozen=True)
class PairExamples:
    first: np.ndarray  # (P,) int64 item index, the earlier interaction
    second: np.ndarray  # (P,) int64 item index, the later interaction
    user: np.ndarray  # (P,) int64 dense user index (only to route LOCAL parameters)
    time: np.ndarray  # (P,) int64 timestamp of the later interaction

    def __len__(self) -> int:
        return len(self.first)


def build_pairs(history: UserHistories, pairing: str = "disjoint") -> PairExamples:
    """Pairs of each user's time-ordered history (vectorized over users)."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    lengths = history.lengths()
    n = len(history.items)
    owner = np.repeat(np.arange(history.num_users), lengths)
    position = np.arange(n) - np.repeat(history.indptr[:-1], lengths)
    has_next = position < np.repeat(lengths, lengths) - 1
    if pairing == "disjoint":
        start = has_next & (position % 2 == 0)
    else:
        start = has_next
    i = np.flatnonzero(start)
    return PairExamples(
        first=history.items[i],
        second=history.items[i + 1],
        user=owner[i],
        time=history.timestamps[i + 1],
    )


def sample_negatives(
    first: torch.Tensor,
    second: torch.Tensor,
    num_items: int,
    num_negatives: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform catalogue negatives (B, N), shared by an example's two directions, and the mask
    (B, 2, N) of accidental hits (a negative equal to that direction's true item)."""
    negatives = torch.randint(num_items, (first.shape[0], num_negatives), generator=generator)
    targets = torch.stack([second, first], dim=1)  # slot 0 predicts second, slot 1 first
    return negatives, negatives[:, None, :] == targets[:, :, None]


class PairSoftmaxLoss(torch.nn.Module):
    """Per-example sampled-softmax loss summed over the example's two directions.

    Has a `reduction` attribute so that Opacus's ghost clipping can ask for per-sample losses.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        # logits (B, 2, 1+N); hits (B, 2, N) masks negatives equal to the target
        masked = torch.cat(
            [logits[..., :1], logits[..., 1:].masked_fill(hits, float("-inf"))], dim=-1
        )
        per_example = -torch.log_softmax(masked, dim=-1)[..., 0].sum(dim=1)  # (B,)
        if self.reduction == "none":
            return per_example
        if self.reduction == "sum":
            return per_example.sum()
        return per_example.mean()

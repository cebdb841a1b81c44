"""Training examples built so that the privacy argument holds.

Two forms:

- `single` (what DP training uses): one example per interaction, its item scored with NO
  context item (`RecModel.forward(None, item, ...)`): the loss depends on that interaction
  (item, timestamp), public values (the catalogue, negatives drawn from the public catalogue)
  and the global parameters only. Adding or removing one interaction adds or removes exactly
  its own example and changes no other, whatever else the user holds, whenever it arrived: so
  DP-SGD's add/remove-one-example guarantee, at the sensitivity C it assumes, is a guarantee
  for each interaction. Any rule that forms PAIRS from the set of a user's interactions fails
  this: one interaction's presence shifts the parity of every later pair, or re-links a chain,
  so the release differs in many examples (a tested property: `tests/test_examples.py`).
- `consecutive`: every consecutive pair (i, i+1), trained in both directions in one example:
  loss = CE(b | context a) + CE(a | context b), against the same negatives. Each interaction is
  in up to two examples and a removal re-links the chain, so it is only for non-private
  training (no per-interaction guarantee is stated there).

Negatives are public randomness: they never depend on other examples (no in-batch negatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedrec.common.data.history import UserHistories

FORMS = ("single", "consecutive")


@dataclass(frozen=True)
class Examples:
    first: np.ndarray | None  # (P,) int64 item index of the context; None: single interactions
    second: np.ndarray  # (P,) int64 item index of the (later) interaction
    user: np.ndarray  # (P,) int64 dense user index (only to route LOCAL parameters)
    time: np.ndarray  # (P,) int64 timestamp of the (later) interaction

    def __len__(self) -> int:
        return len(self.second)


def build_examples(history: UserHistories, form: str) -> Examples:
    """Examples of each user's time-ordered history (vectorized over users)."""
    if form not in FORMS:
        raise ValueError(f"unknown example form {form!r}; choose one of {', '.join(FORMS)}")
    lengths = history.lengths()
    n = len(history.items)
    owner = np.repeat(np.arange(history.num_users), lengths)
    if form == "single":
        return Examples(
            first=None, second=history.items.copy(), user=owner, time=history.timestamps.copy()
        )
    position = np.arange(n) - np.repeat(history.indptr[:-1], lengths)
    i = np.flatnonzero(position < np.repeat(lengths, lengths) - 1)
    return Examples(
        first=history.items[i],
        second=history.items[i + 1],
        user=owner[i],
        time=history.timestamps[i + 1],
    )


def sample_negatives(
    first: torch.Tensor | None,
    second: torch.Tensor,
    num_items: int,
    num_negatives: int,
    generator: torch.Generator,
    *,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform catalogue negatives (B, N), shared by an example's directions, and the mask
    (B, S, N) of accidental hits (a negative equal to that direction's true item); S = 2 for a
    pair, 1 for a single interaction (`first=None`). The same draws either way.

    `shared`: one (1, N) draw for the whole batch (`RecModel.forward_shared` scores it in one
    product). Each example still meets N uniform catalogue items, only no longer independent of
    the other examples' draws: for plain training, never for per-example DP clipping."""
    rows = 1 if shared else second.shape[0]
    negatives = torch.randint(num_items, (rows, num_negatives), generator=generator)
    # slot 0 predicts second, slot 1 first
    targets = second[:, None] if first is None else torch.stack([second, first], dim=1)
    return negatives, negatives[:, None, :] == targets[:, :, None]


class PairSoftmaxLoss(torch.nn.Module):
    """Per-example sampled-softmax loss summed over the example's directions (two for a pair,
    one for a single interaction).

    Has a `reduction` attribute so that Opacus's ghost clipping can ask for per-sample losses.
    """

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, hits: torch.Tensor) -> torch.Tensor:
        # logits (B, S, 1+N); hits (B, S, N) masks negatives equal to the target
        masked = torch.cat(
            [logits[..., :1], logits[..., 1:].masked_fill(hits, float("-inf"))], dim=-1
        )
        per_example = -torch.log_softmax(masked, dim=-1)[..., 0].sum(dim=1)  # (B,)
        if self.reduction == "none":
            return per_example
        if self.reduction == "sum":
            return per_example.sum()
        return per_example.mean()

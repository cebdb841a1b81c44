"""The model's settings, apart from the model: parsing a run's configuration needs them, and
must not import torch (seconds of every command line, usage errors included)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 64  # embedding size
    text_dim: int = 64  # PCA of the public text embeddings: candidates stay cheap to gather
    # time-varying item bias over the training span: popularity drifts, and without it the
    # centralized model falls below popularity (docs/results.md, "Results")
    time_knots: int = 4
    # Per-item id vectors (E_ctx, E_tgt). Off: a content model (text, year, per-item biases):
    # ~20x fewer parameters, so dense DP noise drowns far less of the signal.
    id_embeddings: bool = True
    user_embedding: bool = False  # a LOCAL per-user vector (only user-level DP covers it)
    history_half_life: float = 3.0  # inference: weight of the k-th most recent item is 2^(-k/h)
    # Item biases (static and time-varying) are bias_scale * their stored values: the gradient
    # w.r.t. them grows by bias_scale, so under per-example clipping biases get a larger share
    # of the clipping budget C (popularity is the signal that survives noise best).
    bias_scale: float = 1.0
    # Content popularity: a global w with bias += w·t_i over the public text features (64
    # numbers; a least-squares fit of recent counts on text and year alone reaches
    # popularity's NDCG on the built-in data). Few coordinates, so it survives the noise of
    # local DP that drowns per-item biases; under the default calibration it takes clipping
    # budget from the item biases, which carry more (docs/results.md), so it is off there.
    text_bias: bool = False
    # Comma-separated global parameters to train ("" = all). The others are FROZEN: fewer
    # noised coordinates, for calibrations whose noise drowns anything larger (local DP:
    # "text_bias.weight" trains only the 64-number content popularity).
    train_only: str = ""

    def __post_init__(self) -> None:
        if self.dim < 1 or self.text_dim < 1 or self.time_knots < 1:
            raise ValueError("dim, text_dim and time_knots must be >= 1")
        if not self.bias_scale > 0:
            raise ValueError(f"bias_scale must be > 0, got {self.bias_scale}")


def single_interaction_parameters(config: ModelConfig) -> tuple[str, ...]:
    """The global parameters a one-interaction example (`forward` with `first=None`) gives a
    gradient: the item and year tables and the content bias; the target-side text projection
    too when a local user vector makes q nonzero. Trained with DP-SGD on such examples, every
    other parameter would receive noise alone."""
    names = ("item_table.weight", "year_table.weight")
    names += ("tgt_text.weight",) if config.user_embedding else ()
    return names + (("text_bias.weight",) if config.text_bias else ())

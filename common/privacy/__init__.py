"""Privacy accounting: pure functions over recorded mechanisms (no Flower, no training)."""

# How a device clips per-example gradients: fedrec's fused path (`dpsgd`), or Opacus's own
# machinery. Here, not in `dpsgd`: parsing a run's settings must not import torch.
CLIPPING = ("fused", "opacus")

"""Helpers around Opacus DP-SGD that the centralized trainer and the clients share, and the
clients' fused per-example clipping (`GradientTaps`, `clip_per_example`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

GRAD_SAMPLE_MODE = "ghost"  # exact per-sample norms without per-sample embedding gradients


def step_on_empty_batch(optimizer: torch.optim.Optimizer) -> None:
    """Take a DP-SGD step for a Poisson batch that drew no example.

    The sum of clipped per-example gradients over an empty batch is zero, but the step must
    still add noise and be counted by the accountant: skipping it would under-count ε (the
    analysis of Poisson-subsampled Gaussian assumes every sampling round releases an output).
    Opacus's ghost-clipping norm samplers cannot run on a zero-size batch, so instead of
    forward/backward we hand the DP optimizer zero gradients, which it accumulates, noises,
    scales and reports to the accountant exactly like any other step. With per-sample gradients
    kept (Opacus's hooks or ExpandedWeights) the optimizer reads `grad_sample` instead: one
    zero "sample", whose clipped contribution is zero, stands for the empty batch.
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping

    optimizer.zero_grad(set_to_none=True)
    per_sample = not isinstance(optimizer, DPOptimizerFastGradientClipping)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad = torch.zeros_like(param)
                if per_sample:
                    param.grad_sample = torch.zeros((1, *param.shape), dtype=param.dtype)
    optimizer.step()


def silence_known_opacus_warnings() -> None:
    """Two warnings Opacus prints on every step that say nothing about our setup.

    "Secure RNG turned off": Opacus's own generator never draws fedrec's noise or batches
    (`draw_noise_from`, `secure_poisson_loader`, the devices' `PrivacyRandomness`). "Full
    backward hook is firing ...": ghost clipping's second backward pass on integer (index)
    inputs.
    """
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")


def gram_embedding_norms(
    layer: torch.nn.Embedding, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """Exact per-example gradient norms of an embedding looked up at (B, T) indices.

    Example n's gradient is sum_t e_{i_nt} g_nt^T, so its squared norm is
    sum_{t,t'} [i_nt == i_nt'] <g_nt, g_nt'>: a (B, T, T) Gram matrix masked by index
    equality. Same value as Opacus's sort-based sampler (tested), without `torch.unique`,
    whose cost dominates a DP step on lookups as small as ours (100 negatives).
    """
    index = activations[0].reshape(activations[0].shape[0], -1)  # (B, T)
    grads = backprops.reshape(index.shape[0], index.shape[1], -1).to(torch.float64)  # (B, T, D)
    return {layer.weight: masked_gram_squared_norms(index, grads).sqrt().to(backprops.dtype)}


def masked_gram_squared_norms(index: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(B,) squared norms of per-example embedding gradients from (B, T) lookups with (B, T, D)
    output gradients: sum_{t,t'} [i_nt == i_nt'] <g_nt, g_nt'>."""
    same = (index[:, :, None] == index[:, None, :]).to(grads.dtype)
    return (torch.bmm(grads, grads.transpose(1, 2)) * same).sum(dim=(1, 2)).clamp(min=0)


class GramEmbedding(torch.nn.Embedding):
    """An nn.Embedding whose DP per-example norms use `gram_embedding_norms`."""


def register_gram_embedding() -> None:
    """Tell Opacus how to clip GramEmbedding (idempotent; call before wrapping a model)."""
    from opacus.grad_sample.embedding import compute_embedding_grad_sample
    from opacus.grad_sample.utils import register_grad_sampler, register_norm_sampler

    register_grad_sampler(GramEmbedding)(compute_embedding_grad_sample)
    register_norm_sampler(GramEmbedding)(gram_embedding_norms)


def noise_later_dp_optimizer(
    optimizer: torch.optim.Optimizer, max_grad_norm: float, expected_batch_size: int
) -> torch.optim.Optimizer:
    """Opacus's DPOptimizer (per-sample gradients kept, mean loss) for callers that add the noise
    themselves, once, after the steps (see client/training.py: fixed-point steps whose noises
    sum to one draw). Clipping and accumulation are Opacus's own; only the noise stage, which
    at noise_multiplier 0 would allocate and add a zero tensor per parameter, becomes the
    division by B. Same output as DPOptimizer(noise_multiplier=0) (tested)."""
    from opacus.optimizers import DPOptimizer
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    class NoiseLaterDPOptimizer(DPOptimizer):
        def add_noise(self) -> None:
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                p.grad = (p.summed_grad / self.expected_batch_size).view_as(p)
                _mark_as_processed(p.summed_grad)

        def scale_grad(self) -> None:  # done in add_noise
            pass

    return NoiseLaterDPOptimizer(
        optimizer,
        noise_multiplier=0.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
    )


# -- fused per-example clipping ---------------------------------------------------------------
#
# Opacus computes per-example gradients layer by layer, through hooks or ExpandedWeights, and
# clips them parameter by parameter in Python. For the device's model (five small tables, a
# handful of examples per step) that machinery, not arithmetic, is the cost: a DP step took
# ~2x a plain one. The same clipping for Linear and Embedding weights needs only what Opacus's
# grad samplers read, each weight use's input and output gradient, so a forward records the
# uses (`GradientTaps`), ONE backward stops at their outputs, and a few batched ops give every
# example's norm (over all weights jointly) and the clipped sum. Same formula as Opacus:
# factor min(1, C / (||g_n|| + 1e-6)), tested equal to Opacus's hooks + DPOptimizer.


@dataclass(frozen=True, eq=False)
class WeightUse:
    kind: Literal["linear", "embedding"]
    weight: nn.Parameter
    input: torch.Tensor  # (B, ..., in) activations, or (B, ...) indices
    output: torch.Tensor  # what the layer returned; its gradient is the backprop


class GradientTaps:
    """Records every trainable Linear / Embedding weight's use during one forward pass.

    A model routes its layer calls through `linear` / `embedding` when given taps (the values
    are the layers' own; only the weight's gradient path is cut, so that the backward stops at
    the outputs). Inputs are batch-first. A weight may be used once per forward: the
    per-example norm of a weight used twice needs the cross terms of its uses."""

    def __init__(self) -> None:
        self.uses: list[WeightUse] = []

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not layer.weight.requires_grad:
            return layer(x)
        if layer.bias is not None:
            raise ValueError("GradientTaps: a Linear with a bias is not supported")
        out = F.linear(x, layer.weight.detach())
        if not out.requires_grad:  # a public input: the output is where the gradient starts
            out.requires_grad_()
        return self._record("linear", layer.weight, x.detach(), out)

    def embedding(self, layer: nn.Embedding, index: torch.Tensor) -> torch.Tensor:
        if not layer.weight.requires_grad:
            return layer(index)
        if layer.padding_idx is not None or layer.max_norm is not None or layer.sparse:
            raise ValueError("GradientTaps: padding_idx, max_norm and sparse are not supported")
        out = F.embedding(index, layer.weight.detach()).requires_grad_()
        return self._record("embedding", layer.weight, index, out)

    def _record(self, kind, weight, inputs, out) -> torch.Tensor:
        if any(use.weight is weight for use in self.uses):
            raise ValueError(f"GradientTaps: weight {tuple(weight.shape)} used twice in a forward")
        self.uses.append(WeightUse(kind, weight, inputs, out))
        return out

    def require_all(self, module: nn.Module) -> None:
        """Raise unless every trainable parameter of `module` was used through these taps (an
        untapped one would silently get no gradient)."""
        tapped = {id(use.weight) for use in self.uses}
        missed = [
            n for n, p in module.named_parameters() if p.requires_grad and id(p) not in tapped
        ]
        if missed:
            raise ValueError(f"GradientTaps: trainable parameters not tapped: {missed}")


def clip_per_example(
    loss_sum: torch.Tensor,
    taps: GradientTaps,
    clip_norm: float,
    batch_size: int,
    divide_by: float = 1.0,
) -> torch.Tensor:
    """Set every tapped weight's `.grad` to the sum over the batch of its per-example gradients,
    each example's gradient (all weights jointly) clipped to `clip_norm` with Opacus's factor,
    divided by `divide_by`. `loss_sum` is the SUM of the `batch_size` per-example losses.
    Returns the (B,) per-example norms before clipping."""
    grads = torch.autograd.grad(loss_sum, [use.output for use in taps.uses])
    parts = [_per_example(u, g, batch_size) for u, g in zip(taps.uses, grads, strict=True)]
    norms = torch.stack([squared for squared, _ in parts]).sum(dim=0).sqrt()
    factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0) / divide_by
    for use, grad, (_, per_example) in zip(taps.uses, grads, parts, strict=True):
        if per_example is not None:  # (B, weight.numel()) already there: one weighted sum
            use.weight.grad = (factor @ per_example).view_as(use.weight)
            continue
        scaled = grad * factor.view(-1, *([1] * (grad.dim() - 1)))
        if use.kind == "linear":
            x = use.input.reshape(-1, use.input.shape[-1])
            use.weight.grad = scaled.reshape(-1, scaled.shape[-1]).T @ x
        else:
            rows = scaled.reshape(-1, use.weight.shape[1])
            zeros = torch.zeros_like(use.weight)
            use.weight.grad = zeros.index_add_(0, use.input.reshape(-1), rows)
    return norms


# Largest per-batch buffer (entries) of per-example embedding row sums; above it, Gram norms.
DENSE_EMBEDDING_LIMIT = 1 << 22
# "auto": the cheaper exact route for each embedding use; tests force "dense" or "gram".
EMBEDDING_NORM_ROUTE: Literal["auto", "dense", "gram"] = "auto"


def _per_example(
    use: WeightUse, grad: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B,) squared norms of each example's gradient of one weight use, by the cheaper exact
    route, and the (B, weight.numel()) per-example gradients where that route built them
    anyway (then the clipped sum is one product instead of a second scatter)."""
    if use.kind == "linear":
        x = use.input.reshape(batch, -1, use.input.shape[-1])  # (B, S, in)
        g = grad.reshape(batch, -1, grad.shape[-1])  # (B, S, out)
        steps, fan_in, fan_out = x.shape[1], x.shape[2], g.shape[2]
        if steps * (fan_in + fan_out) <= fan_in * fan_out:  # ghost: sum_ss' <g,g'><x,x'>
            gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))
            return gram.sum(dim=(1, 2)), None
        per_example = torch.bmm(g.transpose(1, 2), x).reshape(batch, -1)  # (B, out * in)
        return per_example.square().sum(dim=1), per_example
    rows, width = use.weight.shape
    index = use.input.reshape(batch, -1)  # (B, T)
    lookups = index.shape[1]
    g = grad.reshape(batch, lookups, width)  # (B, T, D)
    if _embedding_route(batch, lookups, rows, width) == "gram":
        return masked_gram_squared_norms(index, g), None
    # Example n's gradient has row r = S_nr, the sum of its g_nt looked up at r: one scatter.
    offset = (index + torch.arange(batch).unsqueeze(1) * rows).reshape(-1)
    flat = g.reshape(-1, width)
    sums = torch.zeros(batch * rows, width, dtype=g.dtype).index_add_(0, offset, flat)
    if rows <= lookups:  # a small table: the per-example gradients themselves, summed squared
        per_example = sums.view(batch, rows * width)
        return per_example.square().sum(dim=1), per_example
    # a large table: ||grad_n||^2 = sum_t <g_nt, S_n,i_nt>, a gather of the looked-up rows
    return (flat * sums[offset]).sum(dim=1).view(batch, -1).sum(dim=1), None


def _embedding_route(batch: int, lookups: int, rows: int, width: int) -> str:
    """Row sums cost a (B * rows, D) buffer plus the T lookups; the Gram form a (B, T, T)
    product of D-vectors. Both are exact; the buffer is capped by DENSE_EMBEDDING_LIMIT."""
    if EMBEDDING_NORM_ROUTE != "auto":
        return EMBEDDING_NORM_ROUTE
    dense = batch * rows * width
    if dense > DENSE_EMBEDDING_LIMIT:
        return "gram"
    return (
        "dense" if dense + batch * lookups * width <= batch * lookups**2 * (width + 1) else "gram"
    )


# -- Opacus's randomness from a CSPRNG ----------------------------------------------------------
#
# Opacus draws DP noise and Poisson batches from torch generators (MT19937); its secure_mode
# needs torchcsprng, which is not installable here. These route both through a
# `fedrec.common.privacy.randomness.PrivacyRandomness` instead; everything else stays Opacus's.


def draw_noise_from(optimizer: torch.optim.Optimizer, randomness) -> None:
    """Make an Opacus DP optimizer add its Gaussian noise, N(0, (σC)²) per coordinate of each
    parameter's clipped sum, from `randomness`. Opacus has no hook for a noise source, so the
    instance gets a subclass that overrides only `add_noise` (the same formula as Opacus's)."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    base = type(optimizer)

    class CSPRNGNoise(base):
        def add_noise(self) -> None:
            sigma = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
            for p in self.params:
                _check_processed_flag(p.summed_grad)
                (noise,) = randomness.normal_like(
                    [p.summed_grad], sigma * self.max_grad_norm, dtype=p.summed_grad.dtype
                )
                p.grad = (p.summed_grad + noise).view_as(p)
                _mark_as_processed(p.summed_grad)

    CSPRNGNoise.__name__ = f"CSPRNGNoise{base.__name__}"
    optimizer.__class__ = CSPRNGNoise


class PoissonBatchSampler(torch.utils.data.Sampler):
    """`steps` batches, each example in each independently with rate q (Opacus's
    UniformWithReplacementSampler, its coins from `randomness`)."""

    def __init__(self, *, num_samples: int, sample_rate: float, steps: int, randomness) -> None:
        self.num_samples, self.sample_rate, self.steps = num_samples, sample_rate, steps
        self.randomness = randomness

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            take = self.randomness.bernoulli_tensor(self.num_samples, self.sample_rate)
            yield take.nonzero().reshape(-1).tolist()


def secure_poisson_loader(loader, randomness) -> torch.utils.data.DataLoader:
    """Opacus's DPDataLoader (Poisson batches, empty ones kept) with its coins from
    `randomness`: the same rate, number of steps and collation."""
    sampler = loader.batch_sampler
    return torch.utils.data.DataLoader(
        loader.dataset,
        batch_sampler=PoissonBatchSampler(
            num_samples=sampler.num_samples,
            sample_rate=sampler.sample_rate,
            steps=sampler.steps,
            randomness=randomness,
        ),
        collate_fn=loader.collate_fn,
    )

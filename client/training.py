"""One device's round: prequential evaluation, retirement, DP-SGD, ledger, local state.

A plain function over plain data (no Flower): `local_round(global_params, store, ledger, ...)`.
The order of effects is the privacy argument:
  1. plan: cohorts whose ε would pass the budget after this round are retired (ledger entry)
     BEFORE any step runs (Feldman & Zrnic 2021: a per-record filter that uses only that
     record's own past loss is sound);
  2. DP-SGD steps run in memory;
  3. the ledger entry for those steps is appended and fsync'ed;
  4. only then is local state saved and the update returned (and so sent).
A crash can lose an update, never a ledger entry.

Local steps run at a fixed point: every step's noisy gradient is computed at the RECEIVED
global parameters and the update is their mean. Each step's query then depends only on public
values, so the per-step sums over devices compose (classic sequential local steps would let a
step's query depend on this device's earlier noise, which the sum does not reveal).

All devices work in one unit. A step's sum of clipped per-example gradients (each <= C) is
projected onto the L2 ball of radius B·C, with B = `reference_batch`, a public constant, and
divided by B; the device's Gaussian noise N(0, σ²C²) is added to that sum before the division.
Projection onto a ball is non-expansive, so one interaction still moves a step's sum by <= C:
every interaction's contribution and every device's noise are in units of lr·C/B on every
device, which is what lets the sum over n devices carry noise σ·√n for EACH interaction in it
(DISTRIBUTED, with secure aggregation). A whole update is bounded by lr·C (user-level DP's
sensitivity) whatever the device holds. Devices with fewer than B examples per step count for
less, as in fixed-denominator DP-FedAvg (McMahan et al. 2018).

A device with nothing to train under the DISTRIBUTED calibration still sends a noise-only
update: the number of devices in the sum (and so its noise) must not depend on anyone's data.

Under DP-SGD an example is ONE interaction of a live cohort, scored with no context item
(fedrec.common.examples, `single`): removing an interaction removes its own example and changes
no other, so a step's clipped sum moves by at most C and the ledger charges exactly that
interaction's cohort. The context tower, which no such example reaches, is frozen during the
steps. Without DP-SGD (no per-interaction guarantee) consecutive pairs train it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.client.ledger import PrivacyLedger
from fedrec.client.store import ClientStore, StoredInteractions
from fedrec.common.data.history import UserHistories
from fedrec.common.data.schema import Interactions
from fedrec.common.evaluation import rank_test_items
from fedrec.common.examples import PairSoftmaxLoss, sample_negatives
from fedrec.common.model import ModelScorer, RecModel, Scope, catalogue_vectors
from fedrec.common.privacy import CLIPPING
from fedrec.common.privacy.accounting import DiscreteGaussian, Guarantee, Mechanism
from fedrec.common.privacy.dpsgd import (
    GRAD_SAMPLE_MODE,
    GradientTaps,
    clip_per_example,
    noise_later_dp_optimizer,
    register_gram_embedding,
    silence_known_opacus_warnings,
    step_on_empty_batch,
)
from fedrec.common.privacy.randomness import PrivacyRandomness, privacy_randomness
from fedrec.common.run_model import load_parameters
from fedrec.common.types import Metrics

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalTrainConfig:
    steps: int = 4  # DP-SGD steps per round
    sample_rate: float = 0.5  # Poisson rate per step; fixed, so ledgers hold few distinct (q, σ)
    lr: float = 0.5  # scale of the returned update (the server applies its own learning rate)
    num_negatives: int = 100
    clip_norm: float = 1.0  # per-example L2 clipping norm C
    noise_multiplier: float = 1.0  # σ the device adds (already σ_aggregate/√K_min if distributed)
    aggregate_noise_multiplier: float | None = None  # σ the sum of >= K_min devices carries
    min_survivors: int | None = None  # K_min
    delta: float = 1e-5
    budget_epsilon: float = 8.0  # per interaction, for `budget_guarantee`
    budget_guarantee: Guarantee | None = Guarantee.DISTRIBUTED  # None: DP-SGD off
    # B: a step's clipped-gradient sum is projected onto radius B·C and divided by B (see top)
    reference_batch: int = 1
    # "fused": fedrec's per-example clipping (`clip_per_example`); "opacus": Opacus's
    # grad-sample module and DPOptimizer. The same clipped sums (tested).
    clipping: str = "fused"
    # Without DP-SGD, the device clips its whole update to this L2 norm (user-level DP needs a
    # bounded contribution); with DP-SGD the bound lr * C / q holds by construction.
    update_clip_norm: float | None = None
    # Seeds the public randomness (negative items) of a SIMULATED device; None: OS entropy.
    seed: int | None = None
    # DP noise and Poisson sampling come from a CSPRNG keyed with fresh OS entropy, unless
    # this is set: then they are derived from `seed` (tests and benchmarks; voids every
    # guarantee, since whoever knows the seed can regenerate the noise)
    reproducible_noise: bool = False
    # Under SecAgg+ with the distributed discrete Gaussian: the device clips and trains as in
    # DP-SGD but adds no continuous noise; the encoding of its update adds this mechanism's
    # discrete noise (fedrec.common.secagg.encoding), and the ledger charges its RDP
    discrete: DiscreteGaussian | None = None

    @property
    def private(self) -> bool:
        return self.budget_guarantee is not None

    def __post_init__(self) -> None:
        if not (isinstance(self.reference_batch, int) and self.reference_batch >= 1):
            raise ValueError(
                f"reference_batch must be an integer >= 1, got {self.reference_batch!r}"
            )
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if self.clipping not in CLIPPING:
            raise ValueError(f"clipping must be one of {CLIPPING}, got {self.clipping!r}")
        if self.reproducible_noise and self.seed is None:
            raise ValueError("reproducible_noise needs a seed")

    @property
    def noise_only_when_idle(self) -> bool:
        """Under DP-SGD an idle device still sends its noise: under DISTRIBUTED it is its share
        of the sum's noise; under LOCAL, a device that sent nothing when it had nothing to
        train would tell whoever sees its replies whether it held an interaction."""
        return self.private

    def update_noise_std(self) -> float:
        """Std of the device's noise in the returned update: S steps of N(0, σ²C²) on the
        step sums, averaged and scaled by lr/B (0 under the discrete mechanism: its noise
        comes with the encoding)."""
        if self.discrete is not None:
            return 0.0
        return (
            self.lr
            * self.noise_multiplier
            * self.clip_norm
            / (self.reference_batch * math.sqrt(self.steps))
        )

    def mechanism(self) -> Mechanism:
        # under the discrete Gaussian no continuous noise is added: both multipliers are 0
        discrete = self.discrete is not None
        return Mechanism(
            noise_multiplier=0.0 if discrete else self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.steps,
            clip_norm=self.clip_norm,
            delta=self.delta,
            aggregate_noise_multiplier=0.0 if discrete else self.aggregate_noise_multiplier,
            min_survivors=self.min_survivors,
            ddg=self.discrete,
        )


@dataclass(frozen=True)
class LocalResult:
    params: Params | None  # new global parameters; None when it declined (noise-only: see top)
    num_examples: int
    metrics: Metrics
    declined: str | None = None  # the reason, when nothing was trained
    # When nothing is left to train until something new arrives: the metrics every such
    # later round would report (a simulation caches them: the idle marker of
    # fedrec.simulations.devices)
    idle_metrics: Metrics | None = None


def _examples(
    data: StoredInteractions, item_index: dict[str, int], trainable: set[str], private: bool
):
    """The trainable examples, oldest first: under DP-SGD one per interaction of a trainable
    cohort (`first` is None); without it, consecutive pairs of the time-ordered store. Returns
    (first, second, time, {cohort: interactions in the examples})."""
    rows = [r for r in range(len(data)) if data.cohort[r] in trainable]
    if private:
        seconds, firsts = rows, None
    else:
        seconds, firsts = rows[1:], rows[:-1]
    cohorts: dict[str, int] = {}
    for r in sorted(set(seconds) | set(firsts or ())):
        cohorts[data.cohort[r]] = cohorts.get(data.cohort[r], 0) + 1
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64)  # noqa: E731
    items = [item_index[i] for i in data.item]
    return (
        None if firsts is None else as_tensor([items[r] for r in firsts]),
        as_tensor([items[r] for r in seconds]),
        as_tensor([int(data.timestamp[r]) for r in seconds]),
        cohorts,
    )


_CATALOGUE_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _catalogue_for(model: RecModel, global_params: Params, now: int | None):
    """The catalogue's vectors under these global parameters, computed once per process for
    all the devices of a round that share them (they do not depend on a device's own state)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(global_params):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(global_params[name]).tobytes())
    key = (id(model), digest.digest(), now)
    if key not in _CATALOGUE_CACHE:
        _CATALOGUE_CACHE.clear()  # one round's parameters at a time
        _CATALOGUE_CACHE[key] = catalogue_vectors(model, now)
    return _CATALOGUE_CACHE[key]


def prequential_ranks(
    model: RecModel,
    history_items: np.ndarray,
    new_items: np.ndarray,
    now: int | None = None,
    catalogue: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """1-based full-catalogue ranks of newly arrived items, scored BEFORE training on them,
    from the history that preceded them (the evaluation protocol's ranking and tie rule)."""
    if len(new_items) == 0:
        return np.zeros(0, dtype=np.int64)
    history = UserHistories.from_interactions(
        Interactions(
            user=np.zeros(len(history_items), dtype=np.int64),
            item=history_items.astype(np.int64),
            timestamp=np.arange(len(history_items), dtype=np.int64),
        ),
        num_users=1,
    )
    arrived = Interactions(
        user=np.zeros(len(new_items), dtype=np.int64),
        item=new_items.astype(np.int64),
        timestamp=np.arange(len(new_items), dtype=np.int64),
    )
    scorer = ModelScorer(model, history, now=now, catalogue=catalogue)
    return rank_test_items(
        scorer, test=arrived, history=history, num_items=model.num_items, sampled_negatives=0
    ).full


def local_round(
    model: RecModel,
    global_params: Params,
    store: ClientStore,
    ledger: PrivacyLedger,
    item_index: dict[str, int],
    *,
    round: int,
    new_cohorts: frozenset[str],
    config: LocalTrainConfig,
    now: int | None = None,
) -> LocalResult:
    """Run one round on one device. `model` is a reusable template; its global parameters are
    overwritten with `global_params` and its local ones with the device's stored state. The
    round's ledger entries are durable when this returns (one fsync for all of them)."""
    with ledger.synced_once():
        start = time.perf_counter()
        load_parameters(model, global_params, store.load_local_state())
        data = store.interactions()
        metrics: Metrics = {"interactions": float(len(data))}

        # 1. prequential: rank what just arrived with the model as it was before training on it
        if new_cohorts and len(data):
            is_new = np.isin(data.cohort, list(new_cohorts))
            known = np.array([item_index[i] for i in data.item[~is_new]], dtype=np.int64)
            fresh = np.array([item_index[i] for i in data.item[is_new]], dtype=np.int64)
            catalogue = _catalogue_for(model, global_params, now)
            ranks = prequential_ranks(model, known, fresh, now, catalogue)
            metrics["preq_count"] = float(len(ranks))
            metrics["preq_hits@10"] = float(np.sum(ranks <= 10))
            metrics["preq_ndcg@10"] = float(
                np.sum(np.where(ranks <= 10, 1 / np.log2(ranks + 1), 0))
            )

        # 2. retire what would pass its budget, then build the trainable examples
        mechanism = config.mechanism() if config.private else None
        retired_now = _retire(ledger, data, mechanism, config, round, "after this round")
        if retired_now is not None:
            metrics["retired_now"] = float(retired_now)
        cohorts = sorted(set(data.cohort.tolist()) - ledger.retired_cohorts())
        first, second, when, present = _examples(data, item_index, set(cohorts), config.private)
        metrics["retired_cohorts"] = float(len(ledger.retired_cohorts()))
        randomness = privacy_source(config, round)
        if len(second) == 0:
            reason = "no trainable example: every interaction is retired (or alone, without DP)"
            result = idle_result(global_params, config, round, reason, metrics, randomness)
            idle = _idle_metrics(data, ledger, mechanism)
            return dataclasses.replace(result, idle_metrics=idle)

        # 3. local steps
        generator = _generator(config, round)
        new_params, loss = _train(model, first, second, when, config, generator, randomness)

        # 4. the ledger first, then local state, then the update may leave
        idle = None
        if mechanism is not None:
            entry = ledger.append_train(round, mechanism, present)
            eps = ledger.epsilons(config.budget_guarantee, config.delta)
            metrics["max_interaction_epsilon"] = max(eps.values()) if eps else 0.0
            metrics["ledger_seq"] = float(entry["seq"])
            # Retire now what the next round's plan would retire under this round's mechanism,
            # instead of at the device's next visit: never later than the plan, so never more ε;
            # and a device left with nothing to train needs no visit until something arrives.
            metrics["retired_now"] += (
                _retire(ledger, data, mechanism, config, round, "after another round") or 0
            )
            remaining = set(data.cohort.tolist()) - ledger.retired_cohorts()
            if len(_examples(data, item_index, remaining, config.private)[1]) == 0:
                idle = _idle_metrics(data, ledger, mechanism)
        store.save_local_state(_local_state(model))
        metrics |= {
            "loss": loss,
            "examples": float(len(second)),
            "declined": 0.0,
            "seconds": time.perf_counter() - start,
        }
        return LocalResult(new_params, len(second), metrics, idle_metrics=idle)


def _retire(
    ledger: PrivacyLedger,
    data: StoredInteractions,
    mechanism: Mechanism | None,
    config: LocalTrainConfig,
    round: int,
    when: str,
) -> int | None:
    """Retire (ledger entry) every live cohort whose ε would pass the budget after one more
    round of `mechanism`; the count, or None without DP-SGD or live cohorts."""
    live = sorted(set(data.cohort.tolist()) - ledger.retired_cohorts())
    if mechanism is None or not live:
        return None
    _, to_retire = ledger.plan(
        mechanism, live, config.budget_epsilon, config.budget_guarantee, config.delta
    )
    if to_retire:
        ledger.append_retire(
            round,
            sorted(to_retire),
            reason=f"ε would exceed the budget {config.budget_epsilon:g} {when}",
            epsilons=to_retire,
            guarantee=config.budget_guarantee,
            delta=config.delta,
        )
    return len(to_retire)


def _idle_metrics(
    data: StoredInteractions, ledger: PrivacyLedger, mechanism: Mechanism | None
) -> Metrics:
    """What a later round reports while nothing new arrives: exactly the metrics the store
    and ledger would give then (a test holds the cached reply to the real one)."""
    metrics: Metrics = {"interactions": float(len(data))}
    if mechanism is not None and set(data.cohort.tolist()) - ledger.retired_cohorts():
        metrics["retired_now"] = 0.0
    metrics["retired_cohorts"] = float(len(ledger.retired_cohorts()))
    return metrics


def _generator(config: LocalTrainConfig, round: int) -> torch.Generator:
    """The round's PUBLIC randomness (negative items): nothing private depends on it."""
    generator = torch.Generator()
    if config.seed is None:
        generator.seed()
    else:
        generator.manual_seed(config.seed * 1_000_003 + round)
    return generator


def privacy_source(config: LocalTrainConfig, round: int) -> PrivacyRandomness:
    """The round's DP noise and batch sampling: a CSPRNG under a fresh OS key, which neither
    the server nor anyone holding the run's configuration can regenerate (reproducible from
    the seed only where the run opted in, voiding its guarantees)."""
    return privacy_randomness(config.seed if config.reproducible_noise else None, "device", round)


def idle_result(
    global_params: Params,
    config: LocalTrainConfig,
    round: int,
    reason: str,
    metrics: Metrics | None = None,
    randomness: PrivacyRandomness | None = None,
    *,
    draw_noise: bool = True,
) -> LocalResult:
    """The reply of a device with nothing to train: a decline, with its noise under DP-SGD
    (`noise_only_when_idle`; nothing of its data is in it, so nothing is charged).

    `draw_noise=False`: the noise is owed but not drawn here (params None, "noise_only" set):
    for simulated devices whose secure sum draws all their idle shares at once
    (`fedrec.server.secure_aggregation.secure_sum`)."""
    metrics = dict(metrics or {"interactions": 0.0, "retired_cohorts": 0.0})
    metrics |= {"declined": 1.0, "examples": 0.0}
    if config.private and config.noise_only_when_idle:
        if not draw_noise or config.discrete is not None:  # the encoding draws a discrete share
            return LocalResult(None, 0, metrics | {"noise_only": 1.0}, declined=reason)
        noise = _noise_only(global_params, config, randomness or privacy_source(config, round))
        return LocalResult(noise, 0, metrics | {"noise_only": 1.0}, declined=reason)
    return LocalResult(None, 0, metrics, declined=reason)


def _local_state(model: RecModel) -> Params:
    state = model.state_dict()
    return {name: state[name].numpy().copy() for name in model.parameter_names(Scope.LOCAL)}


@contextlib.contextmanager
def context_frozen(model: RecModel, frozen: bool):
    """While `frozen`: the context tower does not require gradients (single-interaction
    examples never reach it, and per-example clipping wants every trainable weight used)."""
    names = model.context_parameter_names() if frozen else []
    for name in names:
        model.get_parameter(name).requires_grad_(False)
    try:
        yield
    finally:
        for name in names:
            model.get_parameter(name).requires_grad_(True)


def _train(
    model, first, second, when, config: LocalTrainConfig, generator, randomness=None
) -> tuple[Params, float]:
    """Fixed-point DP-SGD (plain SGD when not private) steps; returns the new global params and
    the mean loss. `first` None: single-interaction examples. See the module docstring for the
    unit argument. Batch sampling and noise come from `randomness` (a `PrivacyRandomness`;
    default: the round's `privacy_source`), negatives from the public `generator`."""
    randomness = randomness or privacy_source(config, 0)
    with context_frozen(model, first is None):
        return _train_steps(model, first, second, when, config, generator, randomness)


def _train_steps(model, first, second, when, config, generator, randomness) -> tuple[Params, float]:
    model.train()  # Opacus captures activations only in training mode
    names = model.parameter_names(Scope.GLOBAL)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    n = len(second)
    opacus = config.private and config.clipping == "opacus"
    if opacus:
        module, optimizer, criterion = _dp_step_machinery(model, config)
        if hasattr(module, "enable_hooks"):  # ghost clipping's hooks (see _dp_step_machinery)
            module.enable_hooks()
    else:
        module, optimizer = model, _plain_sgd(model, config.lr)
        criterion = PairSoftmaxLoss()
    # a step moves the global parameters by -lr·(clipped sum)/B: at most lr·C after projection
    radius = config.lr * config.clip_norm
    accumulated = {name: torch.zeros_like(p) for name, p in start.items()}
    losses = []
    for _ in range(config.steps):
        # Poisson sampling: each example joins this step's batch independently with rate q.
        take = randomness.bernoulli_tensor(n, config.sample_rate)
        empty = not bool(take.any())
        if opacus and empty:
            step_on_empty_batch(optimizer)  # zero clipped sum, still noised and counted
        elif empty:
            # nothing to do: a private empty batch's step is the zero sum, its noise comes
            # with the others' below and the ledger counts every step (`mechanism`)
            continue
        else:
            a, b, t = None if first is None else first[take], second[take], when[take]
            negatives, hits = sample_negatives(
                a, b, model.num_items, config.num_negatives, generator
            )
            inputs = (a, b, negatives, t)
            if model.config.user_embedding:  # a device's store is one user: local row 0
                inputs = (*inputs, torch.zeros_like(b))
            if config.private and not opacus:
                losses.append(_fused_private_step(model, optimizer, inputs, hits, config))
            else:
                losses.append(_step(module, optimizer, criterion, inputs, hits))
        # keep the step's update, then return to the received parameters
        with torch.no_grad():
            step = {name: p - start[name] for name, p in model.named_parameters() if name in names}
            scale = 1.0
            if config.private:
                norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in step.values())))
                scale = min(1.0, radius / max(norm, 1e-30))  # projection onto the B·C ball
            for name, p in model.named_parameters():
                if name in accumulated:
                    accumulated[name] += step[name] * scale
                    p.copy_(start[name])
        optimizer.zero_grad(set_to_none=True)
    if hasattr(module, "disable_hooks"):
        module.disable_hooks()  # the template is used outside DP-SGD too (inference)
    with torch.no_grad():
        delta = {n: accumulated[n] / config.steps for n in names}
        if config.private and config.discrete is None:
            noise = randomness.normal_like(list(delta.values()), config.update_noise_std())
            for d, z in zip(delta.values(), noise, strict=True):
                d.add_(z)
        if config.update_clip_norm is not None and not config.private:
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values()))
            scale = min(1.0, config.update_clip_norm / max(float(norm), 1e-12))
            delta = {n: d * scale for n, d in delta.items()}
        new = {n: (start[n] + delta[n]).numpy() for n in names}
    return new, float(np.mean(losses)) if losses else math.nan


_PLAIN_SGD: dict[tuple[int, float], tuple[weakref.ref, torch.optim.SGD]] = {}


def _plain_sgd(model: RecModel, lr: float) -> torch.optim.SGD:
    """The template's SGD optimizer, built once per process: plain SGD keeps no state between
    steps (no momentum), so one serves every device round and none pays for building it.
    Checked against the model itself, not only its id: a new model may reuse a freed one's
    id, and the old optimizer would then step the old parameters (an update of zero)."""
    key = (id(model), lr)
    cached = _PLAIN_SGD.get(key)
    if cached is None or cached[0]() is not model:
        _PLAIN_SGD.clear()  # one template in use at a time
        _PLAIN_SGD[key] = (weakref.ref(model), torch.optim.SGD(model.parameters(), lr=lr))
    return _PLAIN_SGD[key][1]


def _step(module, optimizer, criterion, inputs, hits) -> float:
    """One SGD step, or one Opacus DP-SGD step whose noise is added later; returns the loss."""
    # before the forward: ExpandedWeights refuses to run over stale per-sample gradients
    # (say, of a device round that raised in this worker process)
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(module(*inputs), hits)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _fused_private_step(model, optimizer, inputs, hits, config: LocalTrainConfig) -> float:
    """One DP-SGD step (noise added later) with fedrec's fused per-example clipping: the same
    clipped sum, divided by B, as `_dp_step_machinery`'s Opacus step (tested).

    A batch of ONE example (74% of the default job's training rounds) needs no per-example
    machinery at all: its per-example gradient is the batch gradient, and Opacus's factor
    min(1, C / (||g|| + 1e-6)) is exactly `clip_grad_norm_`'s (same formula, same 1e-6)."""
    optimizer.zero_grad(set_to_none=True)
    batch = len(inputs[1])
    if batch == 1:
        loss = PairSoftmaxLoss(reduction="sum")(model(*inputs), hits)
        loss.backward()
        trained = [p for p in model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(trained, config.clip_norm)
        for p in trained:
            p.grad.div_(config.reference_batch)
    else:
        taps = GradientTaps()
        loss = PairSoftmaxLoss(reduction="sum")(model(*inputs, taps=taps), hits)
        taps.require_all(model)
        clip_per_example(loss, taps, config.clip_norm, batch, divide_by=config.reference_batch)
    optimizer.step()
    return float(loss.item()) / batch


_DP_MACHINERY: dict[tuple, tuple] = {}


def _dp_step_machinery(model: RecModel, config: LocalTrainConfig):
    """Opacus's grad-sample module, DP optimizer and loss around the template `model` (the
    `clipping = "opacus"` path; the default "fused" path gives the same sums faster), built
    once per (template, clip norm, B, lr) and reused by every device of the process: wrapping
    a model wraps every layer, a cost no device round should pay.

    Per-sample gradients: Opacus's ExpandedWeights mode (grad_sample_mode "ew": PyTorch's
    per-sample gradients computed inside autograd in one backward pass, no Python hook per
    layer) for the content model, whose item table has a few columns; ghost clipping (two
    backward passes, norms only) when per-item id vectors make per-sample gradients large.
    "ew" gives the same per-sample gradients as Opacus's hooks (tested).

    noise_multiplier 0: all steps run at the same parameters and only their mean leaves, so
    the sum of S independent N(0, σ²C²) step noises is drawn once at the end, N(0, S σ²C²):
    the same output distribution (a post-processing of the S noisy steps the ledger records)
    at 1/S of the cost of noising every parameter each step. B (expected_batch_size) is the
    public reference batch, the same on every device."""
    ghost = model.config.id_embeddings
    key = (id(model), config.clip_norm, config.reference_batch, config.lr, ghost)
    if key not in _DP_MACHINERY:
        silence_known_opacus_warnings()
        register_gram_embedding()
        for old_module, *_ in _DP_MACHINERY.values():
            old_module._close()  # one template in use at a time: its hooks come off
        _DP_MACHINERY.clear()
        sgd = torch.optim.SGD(model.parameters(), lr=config.lr)
        if ghost:
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            module = GradSampleModuleFastGradientClipping(
                model,
                max_grad_norm=config.clip_norm,
                use_ghost_clipping=GRAD_SAMPLE_MODE == "ghost",
            )
            optimizer = DPOptimizerFastGradientClipping(
                sgd,
                noise_multiplier=0.0,
                max_grad_norm=config.clip_norm,
                expected_batch_size=config.reference_batch,
            )
            criterion = DPLossFastGradientClipping(module, optimizer, PairSoftmaxLoss())
        else:
            module = _expanded_weights_module(model)
            optimizer = noise_later_dp_optimizer(
                sgd, max_grad_norm=config.clip_norm, expected_batch_size=config.reference_batch
            )
            criterion = PairSoftmaxLoss()
        _DP_MACHINERY[key] = (module, optimizer, criterion)
    return _DP_MACHINERY[key]


def _expanded_weights_module(model: RecModel):
    """Opacus's ExpandedWeights module around `model`, with the batch size taken from the
    target items (`second`): Opacus reads it from the first input, which single-interaction
    examples do not have (`first=None`)."""
    from opacus.grad_sample import GradSampleModuleExpandedWeights
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    class TargetBatch(GradSampleModuleExpandedWeights):
        def forward(self, first, second, *args, **kwargs):
            return call_for_per_sample_grads(
                module=self._module, batch_size=second.shape[0], loss_reduction=self.loss_reduction
            )(first, second, *args, **kwargs)

    return TargetBatch(model, batch_first=True, loss_reduction="mean")


def _noise_only(
    global_params: Params, config: LocalTrainConfig, randomness: PrivacyRandomness
) -> Params:
    """An idle device's share of the sum's noise: the received parameters plus its noise."""
    values = list(global_params.values())
    noise = randomness.normal_like(values, config.update_noise_std())
    return {
        name: (torch.from_numpy(np.asarray(value, dtype=np.float32)) + z).numpy()
        for (name, value), z in zip(global_params.items(), noise, strict=True)
    }

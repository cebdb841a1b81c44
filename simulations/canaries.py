"""Dirac canaries through the real device code, seen the way the threat model's adversary sees them.

Each canary is ONE interaction with a fresh item that no other data uses, on its own device,
included by a fair coin (the auditor's randomness). Its gradient lands mostly in that item's
own bias, so m canaries are m separate trials of one mechanism. Every device is a real one:
a `ClientStore` and a `PrivacyLedger` in a folder, and `local_round` (the fused DP-SGD step,
the projection onto B·C, the device's own noise, retirement by the ledger) with the device
settings the run would send (`fedrec.client.runtime.local_config`). Nothing in it knows about
canaries.

The adversary's view is the calibration's threat model:
- DISTRIBUTED: the server sees one SUM per round over the devices of a secure aggregation
  (`fedrec.server.secure_aggregation.secure_sum`). A sum holds K devices, one canary each, every
  device adding σ/√K: the sum carries σ·C around each canary exactly as a shipped round of
  K_min = 2,350 devices does (a sum of independent Gaussians is the Gaussian of the summed
  variances), and the ledger, planning with K_min = K, charges the same ε. More devices would
  only add more canaries per sum, not change one canary's mechanism.
- LOCAL: the server sees each device's own update.
Canaries run in batches of K devices, each batch from the same sent parameters and with its own
fresh devices; the K canary items are reused by every batch. A batch's releases depend only on
its own canaries, so each canary stays its own trial (Steinke et al. need DP in each canary's
inclusion, which changing one coin changes in one batch only).

The server chooses what it sends (the guarantee holds whatever it sends), so the auditor sends
parameters under which the devices' background interactions are already predicted with
certainty (their gradient vanishes, so the projection onto B·C leaves a canary's clipped
gradient whole) and repeats the same parameters in every round a canary trains. Each device
also holds three background interactions, arriving before its canary: the device always has
something to train (a device without would decline, and under LOCAL a decline is visible), and
with pairs formed on arrival the canary is the second half of its own pair, with singletons its
own example: either way including it changes exactly one example.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BACKGROUND = "background"  # the one public item the devices' other interactions are of
BACKGROUND_PER_DEVICE = 3
FILLERS = 1000  # unused public items: the negatives a canary competes against
DOMINANT_LOGIT = 30.0  # the background item's logit in what the auditor sends
CONTROL_BUDGET = 1e9  # a control's devices never retire: it trains as many rounds as the claim


@dataclass(frozen=True)
class Releases:
    """What the adversary saw of each canary, and what the mechanism claims."""

    scores: np.ndarray  # (m,) change of the canary item's bias, summed over its rounds
    included: np.ndarray  # (m,) bool: the fair coins
    rounds: int  # rounds each canary trained (until the honest ledger retires it)
    view: str  # "distributed" (one sum per round) or "local" (one update per device)
    claimed_epsilon: float  # the ledger's ε of a canary after `rounds` honest rounds
    claimed_noise_multiplier: float  # σ around a canary in the view (honest)
    noise_multiplier: float  # σ the devices really added, in the view
    noise_scale: float  # noise_multiplier / claimed_noise_multiplier (1: honest)
    sample_rate: float
    steps: int
    clip_norm: float
    devices_per_release: int  # K (devices in one sum under DISTRIBUTED)


def device_settings(sim, *, devices_per_sum: int, noise_scale: float):
    """The device settings of `sim` (a SimulationConfig), with the sum scaled down to
    `devices_per_sum` devices at the same σ per sum, and the devices' noise multiplied by
    `noise_scale` (a control: the claim stays that of σ)."""
    from fedrec.client.runtime import local_config

    if sim.secagg:
        raise ValueError(
            "the canary audit replays continuous Gaussian releases; the discrete Gaussian of "
            'secure-aggregation-protocol = "secagg" is not covered by it'
        )
    distributed = "distributed" in sim.dp
    scaled = dataclasses.replace(sim, min_survivors=devices_per_sum) if distributed else sim
    honest = local_config(scaled, None)
    if not honest.private:
        raise ValueError(f"calibration {sorted(sim.dp)} runs no DP-SGD: no per-interaction claim")
    if noise_scale == 1.0:
        return honest, honest
    aggregate = honest.aggregate_noise_multiplier
    noisy = dataclasses.replace(
        honest,
        noise_multiplier=honest.noise_multiplier * noise_scale,
        aggregate_noise_multiplier=None if aggregate is None else aggregate * noise_scale,
        budget_epsilon=CONTROL_BUDGET,
    )
    return honest, noisy


def claimed_rounds(honest) -> tuple[int, float]:
    """(rounds, ε): how many rounds one cohort trains before the honest ledger retires it, and
    its ε then, in the budget's view (the device's own planner, on a scratch ledger)."""
    import tempfile

    from fedrec.client.ledger import PrivacyLedger

    mechanism = honest.mechanism()
    with tempfile.TemporaryDirectory() as tmp:
        with PrivacyLedger.open(Path(tmp) / "ledger.jsonl", fsync=False) as ledger:
            rounds = 0
            while rounds < 1000:
                trainable, _ = ledger.plan(
                    mechanism, ["w1"], honest.budget_epsilon, honest.budget_guarantee, honest.delta
                )
                if not trainable:
                    break
                rounds += 1
                ledger.append_train(rounds, mechanism, {"w1": 1})
            eps = ledger.epsilons(honest.budget_guarantee, honest.delta).get("w1", 0.0)
    return rounds, eps


def _catalogue(model_config, slots: int):
    """Public items: the background item, one fresh item per canary slot, unused fillers."""
    from fedrec.common.model import RecModel

    items = [BACKGROUND, *(f"canary{j:05d}" for j in range(slots))]
    items += [f"filler{j:05d}" for j in range(FILLERS)]
    text = np.zeros((len(items), model_config.text_dim), np.float32)
    text[0, min(1, model_config.text_dim - 1)] = 1.0  # the background item's own direction
    text[1 : 1 + slots, 0] = 1.0  # canaries share one: each is scored on its own bias
    years = np.zeros(len(items), np.int64)  # one year bucket: its gradients cancel in a softmax
    torch.manual_seed(0)
    model = RecModel(model_config, text, years, time_range=(0, 1000))
    return model, {item: i for i, item in enumerate(items)}


def _sent_parameters(model) -> dict[str, np.ndarray]:
    """The model's global parameters, with the background item's logit at DOMINANT_LOGIT."""
    from fedrec.common.model import Scope

    state = model.state_dict()
    params = {n: state[n].numpy().copy() for n in model.parameter_names(Scope.GLOBAL)}
    scale = model.config.bias_scale
    if "item_table.weight" in params:
        params["item_table.weight"][0, model.item_columns["bias"]] = DOMINANT_LOGIT / scale
    elif "text_bias.weight" in params:
        params["text_bias.weight"][0, min(1, model.config.text_dim - 1)] = DOMINANT_LOGIT / scale
    return params


def _biases(model, params: dict[str, np.ndarray]) -> np.ndarray:
    """(I,) every item's bias as the model serves it under `params`."""
    state = model.state_dict()
    for name, value in params.items():
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    model.load_state_dict(state)
    return model.item_vectors()[1].double().numpy()


def run_canaries(
    sim,
    *,
    canaries: int,
    devices_per_sum: int,
    noise_scale: float,
    seed: int,
    folder: Path,
) -> Releases:
    """Train `canaries` Dirac canaries of calibration `sim` and score them from the view."""
    from fedrec.client.ledger import PrivacyLedger
    from fedrec.client.store import ClientStore
    from fedrec.client.training import local_round
    from fedrec.common.privacy.accounting import Guarantee
    from fedrec.common.replies import DeviceReply
    from fedrec.server.secure_aggregation import add_pooled, secure_sum

    honest, device = device_settings(sim, devices_per_sum=devices_per_sum, noise_scale=noise_scale)
    rounds, claimed = claimed_rounds(honest)
    if rounds == 0:
        raise ValueError("the budget allows no round: nothing to audit")
    distributed = honest.budget_guarantee is Guarantee.DISTRIBUTED
    k = devices_per_sum
    model, index = _catalogue(sim.model, k)
    scorer, _ = _catalogue(sim.model, k)
    sent = _sent_parameters(model)
    before = _biases(scorer, sent)
    included = np.random.default_rng([seed, 7]).random(canaries) < 0.5
    scores = np.zeros(canaries)
    for start in range(0, canaries, k):
        batch = range(start, min(start + k, canaries))
        stores, ledgers = [], []
        for j in batch:
            where = folder / f"device{j:06d}"
            store = ClientStore(where, durable=False)
            items = [BACKGROUND] * BACKGROUND_PER_DEVICE
            if included[j]:
                items.append(f"canary{j - start:05d}")
            store.ingest(items, list(range(1, len(items) + 1)), "w1")
            stores.append(store)
            ledgers.append(PrivacyLedger.open(where / "ledger.jsonl", fsync=False))
        try:
            for r in range(1, rounds + 1):
                replies = []
                for slot, (store, ledger) in enumerate(zip(stores, ledgers, strict=True)):
                    result = local_round(
                        model,
                        sent,
                        store,
                        ledger,
                        index,
                        round=r,
                        new_cohorts=frozenset(),
                        config=device,
                    )
                    if result.params is None:
                        raise RuntimeError(f"a canary device declined: {result.declined}")
                    replies.append(DeviceReply(slot, result.params, result.num_examples))
                if distributed:  # what the server of a secure aggregation learns: one sum
                    total = add_pooled([r for r in secure_sum(replies, sent) if r.pooled])
                    released = {n: sent[n] + total.params[n] for n in sent}
                    moved = _biases(scorer, released) - before
                    for slot, j in enumerate(batch):
                        scores[j] += moved[1 + slot]
                else:  # LOCAL: each device's own update
                    for reply, j in zip(replies, batch, strict=True):
                        slot = j - start
                        scores[j] += (_biases(scorer, reply.params) - before)[1 + slot]
        finally:
            for store, ledger in zip(stores, ledgers, strict=True):
                store.close()
                ledger.close()
    view_sigma = honest.noise_multiplier * (math.sqrt(k) if distributed else 1.0)
    return Releases(
        scores=scores,
        included=included,
        rounds=rounds,
        view="distributed" if distributed else "local",
        claimed_epsilon=claimed,
        claimed_noise_multiplier=view_sigma,
        noise_multiplier=view_sigma * noise_scale,
        noise_scale=noise_scale,
        sample_rate=honest.sample_rate,
        steps=honest.steps,
        clip_norm=honest.clip_norm,
        devices_per_release=k if distributed else 1,
    )

"""A real device's round: enforce its privacy policy, then the same `local_round` as the
simulation, then send only what the policy allows. Plain functions (no Flower)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.client.device import (
    LEDGER_FILE,
    SEEN_COHORTS_KEY,
    DeviceConfig,
    PrivacyPolicy,
    save_global,
)
from fedrec.client.store import ClientStore
from fedrec.client.training import LocalResult, LocalTrainConfig


def policy_violation(policy: PrivacyPolicy, requested: LocalTrainConfig) -> str | None:
    """Why the round's requested settings break the device's policy, or None if they fit.
    Under the discrete mechanism (SecAgg+) the noise is the sum's, not the device's own: its
    per-interaction charge against the budget is what the ledger checks (the device refuses
    to unmask below the K_min that charge assumes), so the minimum σ does not apply."""
    if not requested.private:
        return "the run asks for training without DP-SGD; this device's policy requires it"
    if requested.discrete is None and requested.noise_multiplier < policy.min_noise_multiplier:
        return (
            f"requested noise multiplier {requested.noise_multiplier:g} is below this device's "
            f"minimum {policy.min_noise_multiplier:g}"
        )
    if requested.clip_norm > policy.max_clip_norm:
        return (
            f"requested clipping norm {requested.clip_norm:g} is above this device's maximum "
            f"{policy.max_clip_norm:g}"
        )
    return None


def round_settings(
    policy: PrivacyPolicy, run_flat: dict[str, Any], dim: int | None = None
) -> LocalTrainConfig:
    """The run's requested local settings with the DEVICE's budget, δ and guarantee, and fresh
    entropy for its noise (never a seed the server chose). The guarantee is LOCAL, or under
    SecAgg+ (whose sum the device takes part in, and unmasks only at K_min survivors or
    more) DISTRIBUTED. `dim`: the update's coordinates (from the device's own model)."""
    from fedrec.client.runtime import local_config
    from fedrec.common.privacy.accounting import Guarantee
    from fedrec.common.run_config import SimulationConfig

    run = SimulationConfig.from_flat(run_flat)
    requested = local_config(run, seed=None, dim=dim)
    guarantee = Guarantee.DISTRIBUTED if run.secagg else Guarantee.LOCAL
    return dataclasses.replace(
        requested,
        budget_epsilon=policy.epsilon,
        budget_guarantee=guarantee if requested.private else None,
        delta=policy.delta,
        seed=None,
        reproducible_noise=False,
    )


def device_round(
    device: DeviceConfig,
    run_flat: dict[str, Any],
    round: int,
    params: dict[str, np.ndarray],
    catalogue_digest: str = "",
) -> LocalResult:
    """Round `round` on this device. Declines (nothing trained, nothing in the ledger) when
    the requested settings break the policy. Raises StoreError on an unreadable store and
    PublicCatalogueError on a catalogue file that is unreadable or not the run's."""
    from fedrec.client.ledger import PrivacyLedger
    from fedrec.client.runtime import device_template, model_update_dim
    from fedrec.client.training import local_round
    from fedrec.common.run_config import SimulationConfig

    config = SimulationConfig.from_flat(run_flat)
    dim = None
    if config.secagg:  # the discrete mechanism is sized to the device's own model
        dim = model_update_dim(device_template(config, device.catalogue, catalogue_digest)[0])
    settings = round_settings(device.policy, run_flat, dim)
    reason = policy_violation(device.policy, settings)
    if reason is None and not config.per_interaction_holds:
        reason = (
            "the run trains LOCAL parameters (model-user-embedding): no per-interaction "
            "guarantee holds, and this device's policy is a per-interaction budget"
        )
    if reason is not None:
        return LocalResult(None, 0, {"declined": 1.0}, declined=reason)
    model, index = device_template(config, device.catalogue, catalogue_digest)
    folder = Path(device.store)
    with ClientStore(folder, verify=True) as store:
        cohorts = set(store.cohorts())
        seen = set(json.loads(store.get_meta(SEEN_COHORTS_KEY, "[]")))
        unknown = {i for i in store.interactions().item.tolist() if i not in index}
        if unknown:
            return LocalResult(
                None,
                0,
                {"declined": 1.0},
                declined=f"{len(unknown)} stored items are not in the run's catalogue",
            )
        with PrivacyLedger.open(folder / LEDGER_FILE) as ledger:
            result = local_round(
                model,
                params,
                store,
                ledger,
                index,
                round=round,
                new_cohorts=frozenset(cohorts - seen),
                config=settings,
            )
        save_global(folder, params, run_flat, round, catalogue_digest)  # validated by local_round
        store.set_meta(SEEN_COHORTS_KEY, json.dumps(sorted(cohorts | seen)))
    return result


def reply_metrics(result: LocalResult, policy: PrivacyPolicy) -> dict[str, float]:
    """The metrics a device sends: all of them only if its policy allows; otherwise only that
    it declined, when it sent no update (a policy decline, which its data does not decide). An
    update, trained or noise only, travels with nothing else: whether the device trained, and
    the ε its ledger reached, depend on what it holds."""
    if policy.allow_evaluation_metrics:
        return dict(result.metrics)
    return {"declined": 1.0} if result.params is None else {}

"""The empirical privacy audit of a calibration: canaries run through the real device code
(`fedrec.simulations.canaries`), then bounded against the analytic claim by the one-run tests
of `fedrec.common.audit.empirical`. Running the mechanism needs the device side, so it lives
here; the statistics, and reading what a run folder recorded, stay with the audit in common.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrec.common.audit.empirical import BOUNDS, audit_scores, max_certifiable
from fedrec.common.run_config import format_dp


@dataclass(frozen=True)
class EmpiricalConfig:
    """The canary audit of one calibration (a SimulationConfig's device settings)."""

    # m: 2,000 perfect guesses reject ε 10.0 by the GDP test (7.7 with 5 wrong), above the
    # shipped claims (7.16 and 7.08); each canary is one (short) device round
    canaries: int = 2000
    # K devices per secure sum (DISTRIBUTED): each adds σ/√K, so a sum carries the shipped σ
    devices_per_sum: int = 100
    control_noise_scale: float = 0.1  # the negative control adds σ/10 and claims σ
    confidence: float = 0.95
    seed: int = 0  # the auditor's coins (which canaries are in): the experiment's design


def audit_mechanism(sim, config: EmpiricalConfig, noise_scale: float, folder: Path) -> dict:
    """Canaries through `sim`'s devices adding noise_scale·σ, bounded against σ's claim."""
    start = time.perf_counter()
    releases = canary_releases(sim, config, noise_scale, folder)
    return audit_releases(sim, config, releases) | {"seconds": time.perf_counter() - start}


def canary_releases(sim, config: EmpiricalConfig, noise_scale: float, folder: Path):
    """The canaries' scores from the threat model's view (`canaries.run_canaries`)."""
    import torch

    from fedrec.simulations.canaries import run_canaries

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend
    try:
        return run_canaries(
            sim,
            canaries=config.canaries,
            devices_per_sum=config.devices_per_sum,
            noise_scale=noise_scale,
            seed=config.seed,
            folder=folder,
        )
    finally:
        torch.set_num_threads(threads)


def audit_releases(sim, config: EmpiricalConfig, rel) -> dict[str, Any]:
    """Both bounds, the largest certifiable ε and the verdict of one mechanism's canaries."""
    from fedrec.client.runtime import local_config
    from fedrec.simulations.canaries import claimed_rounds

    gaussian = rel.sample_rate == 1.0  # no subsampling: the claim is exactly μ-GDP
    method = "gdp" if gaussian else "steinke"
    delta = sim.delta
    found = {
        name: audit_scores(rel.scores, rel.included, delta, config.confidence, name)
        for name in BOUNDS
    }
    bound = found[method]["epsilon_lower_bound"]
    ceiling = max_certifiable(config.canaries, delta, config.confidence, method)
    return found[method] | {
        "dp": format_dp(sim.dp),
        "view": rel.view,
        "noise_scale": rel.noise_scale,
        "analytic_epsilon": rel.claimed_epsilon,
        # the same claim with the run's own K_min (the audit's sums are scaled down)
        "analytic_epsilon_as_shipped": claimed_rounds(local_config(sim, None))[1],
        "delta": delta,
        "claimed_mu": math.sqrt(rel.rounds) / rel.claimed_noise_multiplier if gaussian else None,
        "max_certifiable": ceiling,
        "can_refute_claim": ceiling > rel.claimed_epsilon,
        "steinke_epsilon_lower_bound": found["steinke"]["epsilon_lower_bound"],
        "steinke_max_certifiable": max_certifiable(
            config.canaries, delta, config.confidence, "steinke"
        ),
        "gdp_epsilon_lower_bound": found["gdp"]["epsilon_lower_bound"],
        "verdict": "violation" if bound > rel.claimed_epsilon else "pass",
        "mechanism": {
            "rounds": rel.rounds,
            "noise_multiplier_claimed": rel.claimed_noise_multiplier,
            "noise_multiplier_added": rel.noise_multiplier,
            "sample_rate": rel.sample_rate,
            "steps": rel.steps,
            "clip_norm": rel.clip_norm,
            "devices_per_release": rel.devices_per_release,
        },
        "score_mean_in": float(rel.scores[rel.included].mean()),
        "score_mean_out": float(rel.scores[~rel.included].mean()),
        "score_std_out": float(rel.scores[~rel.included].std()),
    }


def run_empirical(
    sim, config: EmpiricalConfig, out: Path, noise_scale: float = 1.0
) -> dict[str, Any]:
    """Audit `sim`'s mechanism (its devices adding noise_scale·σ) and the negative control
    (control_noise_scale·σ): the first must pass when honest, the control must fail, else the
    audit had no power to see a violation of that size."""
    out = Path(out)
    results: dict[str, Any] = {"config": dataclasses.asdict(config)}
    for name, scale in (("dp", noise_scale), ("control", config.control_noise_scale)):
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)  # a previous audit's devices: start afresh
        results[name] = audit_mechanism(sim, config, scale, folder)
        shutil.rmtree(folder, ignore_errors=True)  # thousands of device folders: not evidence
    dp, control = results["dp"], results["control"]
    results["dp_epsilon_lower_bound"] = dp["epsilon_lower_bound"]
    results["dp_epsilon_analytic"] = dp["analytic_epsilon"]
    results["control_epsilon_lower_bound"] = control["epsilon_lower_bound"]
    results["lower_bound_within_analytic"] = dp["verdict"] == "pass"
    results["verdict"] = dp["verdict"]
    results["control_detected"] = control["verdict"] == "violation"
    return results

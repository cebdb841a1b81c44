"""The one-run canary audit of the shipped calibrations and their 10x-less-noise controls.

    python benchmarks/audit_empirical.py [--canaries 2000] [--out benchmarks/results]

For the default run (`user+distributed`: the server sees each round's secure sum) and the
`local` calibration (simulations/local_dp.toml: the server sees each device's update), each
as shipped and with its devices adding a tenth of their noise while the claim stays the
shipped one: canaries, guesses, correct, the empirical ε lower bound (GDP test, and Steinke et
al.'s for comparison), the largest ε the design could certify, the analytic ε, the verdict and
the wall time. Writes OUT/audit_empirical.json and OUT/audit_empirical.png (the canaries'
scores, in and out).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from fedrec.common.run_config import SimulationConfig
from fedrec.simulations.empirical_audit import EmpiricalConfig, audit_releases, canary_releases

LOCAL_DP = Path(__file__).resolve().parent.parent / "simulations" / "local_dp.toml"


def calibrations() -> dict[str, SimulationConfig]:
    return {"default": SimulationConfig(), "local": SimulationConfig.from_toml(LOCAL_DP)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--canaries", type=int, default=EmpiricalConfig.canaries)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    config = EmpiricalConfig(canaries=args.canaries)
    rows, scores = [], {}
    for name, sim in calibrations().items():
        for scale in (1.0, config.control_noise_scale):
            start, cpu = time.perf_counter(), time.process_time()
            with tempfile.TemporaryDirectory() as tmp:
                rel = canary_releases(sim, config, scale, Path(tmp))
            row = {"calibration": name} | audit_releases(sim, config, rel)
            row |= {"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
            rows.append(row)
            scores[f"{name} x{scale:g}"] = (rel.scores, rel.included, row)
            print(
                f"{name} noise x{scale:g}: {row['correct']}/{row['guesses']} correct, "
                f"ε ≥ {row['epsilon_lower_bound']:.2f} (Steinke {row['steinke_epsilon_lower_bound']:.2f})"
                f" vs analytic {row['analytic_epsilon']:.2f}, certifiable ≤ "
                f"{row['max_certifiable']:.2f}: {row['verdict']} ({row['wall_s']:.0f} s)",
                flush=True,
            )
    result = {"config": config.__dict__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "audit_empirical.json").write_text(json.dumps(result, indent=2))
    _plot(scores, args.out / "audit_empirical.png")


def _plot(scores: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2))
    for ax, (name, (s, included, row)) in zip(axes, scores.items(), strict=True):
        bins = np.linspace(s.min(), s.max(), 40)
        ax.hist(s[~included], bins=bins, alpha=0.6, label="out")
        ax.hist(s[included], bins=bins, alpha=0.6, label="in")
        ax.set_title(
            f"{name}: ε ≥ {row['epsilon_lower_bound']:.2f}\n"
            f"claimed {row['analytic_epsilon']:.2f}: {row['verdict']}",
            fontsize=9,
        )
        ax.set_xlabel("canary item's bias change")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

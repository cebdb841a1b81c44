"""Federated benchmarks: speed, scale and quality of `fedrec simulate` (not timed tests).

    python benchmarks/federated.py [--skip-scale] [--skip-quality] [--out benchmarks/results]

Writes OUT/federated.json and OUT/federated.md. Every ratio is measured within one run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

from fedrec.client.training import _train
from fedrec.common.run_config import SimulationConfig
from fedrec.simulations.devices import run_in_process
from fedrec.simulations.launcher import simulate
from fedrec.simulations.report import finalize


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def devices_per_second(rows: list[dict]) -> float:
    later = rows[1:] or rows  # round 1 includes Ray start and imports
    return sum(r["sampled"] for r in later) / sum(r["seconds"] for r in later)


def speed(tmp: Path) -> dict:
    base = {"out": str(tmp / "flower")}
    flower_start = time.perf_counter()
    assert simulate(SimulationConfig.from_flat(base), show_progress=False) == 0
    flower_wall = time.perf_counter() - flower_start
    flower_rows = rows_of(tmp / "flower")
    seq_start = time.perf_counter()
    run_in_process(SimulationConfig.from_flat({"out": str(tmp / "sequential")}))
    seq_wall = time.perf_counter() - seq_start
    seq_rows = rows_of(tmp / "sequential")
    rounds_flower = sum(r["seconds"] for r in flower_rows[1:])
    rounds_seq = sum(r["seconds"] for r in seq_rows[1:])
    return {
        "simulation_devices_per_s_after_round_1": devices_per_second(flower_rows),
        "sequential_devices_per_s_after_round_1": devices_per_second(seq_rows),
        "simulation_over_sequential_rounds_2_on": rounds_flower / rounds_seq,
        "simulation_wall_s": flower_wall,
        "sequential_wall_s": seq_wall,
        **dp_ratios(training_batch_sizes(tmp / "flower")),
    }


def _default_job_batch():
    """The default job's model (and a copy Opacus never wraps), device settings, a seeded
    generator and a batch of six pairs at the serving time: what the DP ÷ plain ratios time."""
    from fedrec.client.runtime import local_config, template_for

    model, _ = template_for(SimulationConfig())
    plain_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    job = local_config(SimulationConfig(), seed=0)  # the default job's device settings
    return model, plain_model, job, g, _pairs(model, 6, g)


def _pairs(model, pairs: int, g: torch.Generator):
    first, second = (
        torch.randint(model.num_items, (pairs,), generator=g),
        torch.randint(model.num_items, (pairs,), generator=g),
    )
    return first, second, torch.full((pairs,), int(model.knots[-1]))


def training_batch_sizes(run_dir: Path) -> dict[int, int]:
    """Pairs per training device round of a finished run, from its devices' ledgers (a train
    entry counts each present interaction; a pair is two)."""
    counts: dict[int, int] = {}
    for ledger in (run_dir / "clients").glob("*/ledger.jsonl"):
        for line in ledger.read_text().splitlines():
            entry = json.loads(line)
            if entry["kind"] == "train":
                pairs = sum(entry["cohorts"].values()) // 2
                counts[pairs] = counts.get(pairs, 0) + 1
    return dict(sorted(counts.items()))


def _alternating_ratio(run, repeats: int, blocks: int) -> float:
    """Median over blocks of time(run(True) x repeats) / time(run(False) x repeats), after one
    warm-up call each; the blocks alternate, so drift on a shared machine cancels."""
    for private in (True, False):
        run(private)
    ratios = []
    for _ in range(blocks):
        times = {}
        for private in (True, False):
            start = time.perf_counter()
            for _ in range(repeats):
                run(private)
            times[private] = time.perf_counter() - start
        ratios.append(times[True] / times[False])
    return float(np.median(ratios))


def dp_step_ratio(
    repeats: int = 100, blocks: int = 7, pairs: tuple[int, ...] = (6,), clipping: str = "fused"
) -> float:
    """Time of device local rounds with DP-SGD / without, same examples, same model: one round
    per batch size in `pairs` (cycled). The plain round runs on a copy of the model that
    Opacus never wrapped, as a device without DP-SGD would (hooks left on a model slow its
    plain steps too)."""
    model, plain_model, job, g, _ = _default_job_batch()
    job = dataclasses.replace(job, clipping=clipping)
    batches = [_pairs(model, n, g) for n in pairs]
    configs = {
        True: (model, job),
        False: (plain_model, dataclasses.replace(job, budget_guarantee=None)),
    }

    def device_rounds(private: bool) -> None:
        on, config = configs[private]
        for batch in batches:
            _train(on, *batch, config, g)

    return _alternating_ratio(device_rounds, max(1, repeats // len(batches)), blocks)


def job_mix(sizes: dict[int, int], rounds: int = 100, seed: int = 0) -> tuple[int, ...]:
    """`rounds` batch sizes drawn from a run's distribution of pairs per training round."""
    values = np.array(list(sizes), dtype=np.int64)
    weights = np.array(list(sizes.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    return tuple(int(v) for v in rng.choice(values, size=rounds, p=weights / weights.sum()))


def single_step_ratio(repeats: int = 100, blocks: int = 7, clipping: str = "fused") -> float:
    """One optimizer step alone on the default job's batch (forward, loss, backward, step; for
    DP also the step's Gaussian noise, which the device round draws once for all its steps),
    DP-SGD ÷ plain SGD on a model Opacus never wrapped: without the device round's shared
    work (sampling, negatives, the fixed-point bookkeeping), so the larger of the two ratios."""
    from fedrec.client.training import _dp_step_machinery, _fused_private_step
    from fedrec.common.examples import PairSoftmaxLoss, sample_negatives
    from fedrec.common.privacy.randomness import PrivacyRandomness

    model, plain_model, job, g, (first, second, when) = _default_job_batch()
    negatives, hits = sample_negatives(first, second, model.num_items, 100, g)
    trained = [p for p in model.parameters() if p.requires_grad]
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=job.lr)
    fused_optimizer = torch.optim.SGD(model.parameters(), lr=job.lr)
    inputs = (first, second, negatives, when)
    if clipping == "opacus":  # only then: the fused step runs on a model Opacus never wrapped
        module, dp_optimizer, dp_loss = _dp_step_machinery(model, job)
    randomness = PrivacyRandomness.secure()  # the devices' noise source

    def step(private: bool) -> None:
        if private and clipping == "fused":
            _fused_private_step(model, fused_optimizer, inputs, hits, job)
            randomness.normal_like(trained, job.update_noise_std())
            return
        net, optimizer = (module, dp_optimizer) if private else (plain_model, plain_optimizer)
        optimizer.zero_grad(set_to_none=True)  # before the forward: "ew" requires it
        loss = (dp_loss if private else PairSoftmaxLoss())(
            net(first, second, negatives, when), hits
        )
        loss.backward()
        optimizer.step()
        if private:
            randomness.normal_like(trained, job.update_noise_std())

    ratio = _alternating_ratio(step, repeats, blocks)
    if clipping == "opacus":
        dp_optimizer.zero_grad(set_to_none=True)
    return ratio


def scale(tmp: Path) -> list[dict]:
    """Per-round time and peak RSS at 1k / 10k / 100k registered devices, each size in a fresh
    Python process: a process's peak RSS of its children is a maximum over all of them, so
    sizes run in one process would each report the largest so far."""
    out = []
    for users in (1_000, 10_000, 100_000):
        command = [sys.executable, __file__, "--scale-one", str(users), "--out", str(tmp)]
        done = subprocess.run(command, check=True, capture_output=True, text=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return out


def scale_one(users: int, tmp: Path) -> dict:
    folder = tmp / f"scale-{users}"
    config = SimulationConfig.from_flat(
        {
            "dataset": "synthetic",
            "synthetic": f"num_users={users},num_items=2000,mean_interactions_per_user=6,seed=0",
            "rounds": 4,
            "clients-per-round": 100,
            "out": str(folder),
        }
    )
    assert simulate(config, show_progress=False) == 0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rows = rows_of(folder)
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "registered_clients": users,
        "round_seconds_after_round_1": float(np.mean([r["seconds"] for r in rows[1:]])),
        "peak_child_rss_mb": peak / 1024,
    }


# Local DP's noise drowns per-item parameters: its runs use the experiment file's settings
# (a content-popularity model with few coordinates), the others the defaults.
LOCAL_DP = Path(__file__).resolve().parent.parent / "simulations" / "local_dp.toml"


def dp_ratios(sizes: dict[int, int], clipping: str = "fused") -> dict:
    """DP ÷ plain on the default job's device rounds: at the job's own mix of batch sizes
    (most hold one pair, which skips the per-sample machinery), at one pair, and at six
    pairs (the 99th percentile), plus one optimizer step alone at six pairs. One torch thread,
    as every simulated and deployed device trains (client/app.py, client/warm_exec.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _dp_ratios(sizes, clipping)
    finally:
        torch.set_num_threads(threads)


def _dp_ratios(sizes: dict[int, int], clipping: str) -> dict:
    one = sizes.get(1, 0) / max(1, sum(sizes.values()))
    return {
        "training_rounds_by_pairs": {str(k): v for k, v in sizes.items()},
        "share_of_training_rounds_with_one_pair": one,
        "per_example_clipping": clipping,
        "dp_over_plain_step_job_mix": dp_step_ratio(pairs=job_mix(sizes), clipping=clipping),
        "dp_over_plain_step_one_pair": dp_step_ratio(pairs=(1,), clipping=clipping),
        "dp_over_plain_step_two_pairs": dp_step_ratio(pairs=(2,), clipping=clipping),
        "dp_over_plain_step": dp_step_ratio(clipping=clipping),  # six pairs
        "dp_over_plain_step_16_pairs": dp_step_ratio(pairs=(16,), clipping=clipping),
        "dp_over_plain_single_step": single_step_ratio(clipping=clipping),
    }


NO_DP = LOCAL_DP.with_name("no_dp.toml")


def settings_for(dp: str) -> dict:
    if "local" not in dp:
        return {}
    table = tomllib.loads(LOCAL_DP.read_text())["simulation"]
    return {k: v for k, v in table.items() if k not in ("dp", "out")}


def _mean_last10(prequential: list[dict]) -> float | None:
    values = [r["ndcg@10"] for r in prequential[-10:] if r["ndcg@10"] is not None]
    return float(np.mean(values)) if values else None


def quality(tmp: Path) -> list[dict]:
    out = []
    for dp in ("off", "user", "user+distributed", "user+local", "local"):
        config = SimulationConfig.from_flat(
            {**settings_for(dp), "dp": dp, "out": str(tmp / f"q-{dp}")}
        )
        start = time.perf_counter()
        run = run_in_process(config)
        summary = finalize(run)
        out.append(
            {
                "dp": dp,
                "wall_s": time.perf_counter() - start,
                "published_rounds": summary["published_rounds"],
                "guarantees_not_held": [
                    g["name"] for g in summary["privacy"]["guarantees"] if not g.get("earned")
                ],
                "ndcg@10": summary["test"]["ndcg@10"],
                "hr@10": summary["test"]["hr@10"],
                "guarantees": {g["name"]: g["epsilon"] for g in summary["privacy"]["guarantees"]},
                "last_preq_ndcg@10": summary["prequential"][-1]["ndcg@10"],
                "prequential_last10_ndcg@10": _mean_last10(summary["prequential"]),
            }
        )
    return out


CURVES = {
    # calibration -> (setting varied, values, the guarantee whose ε is plotted)
    "user": ("user-epsilon", (1.0, 4.0, 16.0), "user-level DP of the published global model"),
    "distributed": (
        "aggregate-noise-multiplier",
        (2.8, 1.4, 0.7),
        "per-interaction DP against the server, with secure aggregation",
    ),
    "local": (
        "local-noise-multiplier",
        (4.0, 2.0, 1.0),
        "per-interaction local DP (the device's own noise only)",
    ),
}


def privacy_utility(tmp: Path, out: Path) -> dict:
    """NDCG@10 against ε for each calibration alone; writes OUT/privacy_utility.png."""
    curves: dict[str, list[dict]] = {}
    for dp, (key, values, guarantee) in CURVES.items():
        for value in values:
            folder = tmp / f"curve-{dp}-{value}"
            summary = finalize(
                run_in_process(
                    SimulationConfig.from_flat(
                        {**settings_for(dp), "dp": dp, key: value, "out": str(folder)}
                    )
                )
            )
            eps = {g["name"]: g["epsilon"] for g in summary["privacy"]["guarantees"]}[guarantee]
            curves.setdefault(dp, []).append(
                {key: value, "epsilon": eps, "ndcg@10": summary["test"]["ndcg@10"]}
            )
            print(dp, key, value, eps, summary["test"]["ndcg@10"], flush=True)
    # the line to compare with: federated without DP at its own tuned settings (no_dp.toml;
    # `--dp off` with the DP-tuned defaults diverges)
    no_dp = tomllib.loads(NO_DP.read_text())["simulation"]
    plain = finalize(
        run_in_process(SimulationConfig.from_flat({**no_dp, "out": str(tmp / "curve-off")}))
    )
    plot_curves(curves, plain["test"]["ndcg@10"], out)
    return {"curves": curves, "no_dp_ndcg@10": plain["test"]["ndcg@10"]}


POPULARITY_NDCG = 0.1152  # protocol (a), benchmarks/results/centralized.json
CENTRALIZED_NDCG = 0.1290  # the same file: the non-private centralized model


def plot_curves(curves: dict[str, list[dict]], no_dp: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dp, points in curves.items():
        points = sorted(points, key=lambda p: p["epsilon"])
        ax.plot(
            [p["epsilon"] for p in points], [p["ndcg@10"] for p in points], marker="o", label=dp
        )
    ax.axhline(POPULARITY_NDCG, color="green", linestyle=":", label="popularity")
    ax.axhline(no_dp, color="gray", linestyle="--", label="federated, no DP (no_dp.toml, FedAdam)")
    ax.axhline(CENTRALIZED_NDCG, color="black", linestyle="-.", label="centralized, no DP")
    ax.set(
        xscale="log",
        xlabel="ε of the calibration's guarantee (δ = 1e-5)",
        ylabel="test NDCG@10 (protocol a)",
    )
    ax.set_title(f"privacy-utility, built-in data, {SimulationConfig().rounds} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "privacy_utility.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--scale-one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--only-curve", action="store_true", help="just the privacy-utility curve")
    args = parser.parse_args()
    if args.scale_one:  # one size of `scale`, in its own process
        print(json.dumps(scale_one(args.scale_one, args.out)), flush=True)
        return
    results: dict = {}
    if args.only_curve:
        with tempfile.TemporaryDirectory() as tmp:
            curve = privacy_utility(Path(tmp), args.out)
        (args.out / "privacy_utility.json").write_text(json.dumps(curve, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_speed:  # before scale, whose peak RSS would include its children
            results["speed"] = speed(Path(tmp))
            print(json.dumps(results["speed"], indent=2), flush=True)
        if not args.skip_scale:
            results["scale"] = scale(Path(tmp))
            print(json.dumps(results["scale"], indent=2), flush=True)
        if not args.skip_quality:
            results["quality"] = quality(Path(tmp))
            print(json.dumps(results["quality"], indent=2), flush=True)
    # sections not re-measured this time keep their previous figures
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "federated.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps(previous | results, indent=2))


if __name__ == "__main__":
    main()

"""The end of a federated run: privacy statement, final evaluation, summary.json and plots."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedrec.client import ledger_pass
from fedrec.client.ledger import LedgerEpsilons, ledgers_epsilons
from fedrec.common.baselines import popularity_scorer
from fedrec.common.data.history import UserHistories
from fedrec.common.evaluation import Ranks, evaluate, exposure_ratio, metrics_from_ranks
from fedrec.common.io import atomic_write_json
from fedrec.common.model import ModelScorer
from fedrec.common.privacy.randomness import VOID_REASON
from fedrec.common.reference import baseline_metrics
from fedrec.common.run_config import format_dp
from fedrec.common.train import history_before_test
from fedrec.server.federated_run import FederatedRun
from fedrec.server.user_privacy import discard_delta
from fedrec.simulations.attacks import malicious_draw, run_targets

LEDGER_HEADS_FILE = "ledger_heads.json"


# A run with many device ledgers verifies them in a second process while this one evaluates
# the model: the devices are done, so the second core is free, and the ledger pass was most of
# the report's time. Below this many ledgers, starting a process costs more than it saves.
LEDGERS_IN_OWN_PROCESS = 1000


def client_epsilons(run: FederatedRun) -> Callable[[], LedgerEpsilons]:
    """Start the pass over every device ledger of the run; the returned call gives each
    cohort's ε under the distributed and the local guarantee, the number of retired cohorts
    and the ledgers' head hashes (so an auditor can detect truncation later). Each ledger is
    opened (and verified) once, and the ε of all cohorts converted in one vectorised pass."""
    clients = run.out / "clients"
    paths = ledger_pass.ledger_paths(clients)
    if len(paths) >= LEDGERS_IN_OWN_PROCESS:
        return ledger_pass.start(clients, run.config.delta)
    spent = ledgers_epsilons(paths, run.config.delta)
    return lambda: spent


WHY_NOT_PER_INTERACTION = (
    "the model trains a LOCAL user vector: trained on the device's other interactions, it "
    "feeds every released gradient, so no per-interaction guarantee holds (the ledgers still "
    "budget and retire cohorts under the local mechanism; only user-level DP is stated)"
)


def _not_per_interaction(name: str, delta: float) -> dict:
    """A per-interaction guarantee the run cannot claim (`WHY_NOT_PER_INTERACTION`)."""
    return {
        "name": name,
        "earned": False,
        "why_not": WHY_NOT_PER_INTERACTION,
        "unit": "one interaction",
        "threat_model": "not claimed",
        "epsilon": None,
        "delta": delta,
        "accountant": "none",
    }


def guarantees(run: FederatedRun, eps_distributed: np.ndarray, eps_local: np.ndarray) -> list[dict]:
    """Every guarantee that holds for this run, with its unit, threat model, ε and δ."""
    config, out = run.config, []
    delta = config.delta
    if "user" in config.dp:
        user_eps = run.accountant.epsilon(run.user_delta)
        extra = 0.0
        if "distributed" in config.dp:
            extra = discard_delta(
                epsilon=user_eps,
                rounds=run.accountant.num_rounds,
                registered_clients=len(run.registered),
                sample_rate=run.sample_rate,
                min_survivors=config.min_survivors,
            )
        out.append(
            {
                "name": "user-level DP of the published global model",
                "unit": "one device (all its interactions, whatever it computes)",
                "adjacency": "zero-out: one user's data replaced by none (its device is still "
                "sampled, and under 'distributed' still sends its noise share)",
                "threat_model": "anyone who sees a published global model; trusts the server "
                "to add its noise and devices to bound their own update (lr*C, or clipping)"
                + (
                    " and, for the part of the noise they supply, the devices of each sum "
                    "(at least K_min) to add theirs"
                    if config.user_noise_from_devices > 0 or run.user_ddg is not None
                    else ""
                ),
                "epsilon": user_eps,
                "delta": run.user_delta + extra,
                "delta_from_discarded_rounds": extra,
                "accountant": "RDP, Poisson client sampling at rate "
                f"{run.sample_rate:.5f}, "
                + (
                    f"the devices' distributed discrete Gaussian at n = K_min "
                    f"({config.min_survivors}; Kairouz et al. 2021, Zhu & Wang 2019), no "
                    "server noise"
                    if run.user_ddg is not None
                    else f"noise multiplier {run.noise_multiplier:g} (server "
                    f"{run.server_noise_multiplier:.4g}, devices at least "
                    f"{config.user_noise_from_devices:.4g})"
                ),
            }
        )
    if config.distributed_holds and config.secagg:
        ddg = run.ddg_params
        out.append(
            {
                "name": "per-interaction DP against the server, with secure aggregation",
                "unit": "one interaction (add/remove; each is in one training example)",
                "mechanism": "distributed discrete Gaussian under SecAgg+ (Kairouz, Liu & "
                f"Steinke 2021; Bell et al. 2020): each device N_Z(0, {ddg.sigma:.6g}^2) per "
                f"coordinate at granularity {ddg.gamma:.4g}, mod 2^{ddg.bits}, over "
                f"{ddg.padded_dim} rotated coordinates",
                "threat_model": "an honest-but-curious server that sees only what SecAgg+ "
                "reveals: the modular sum of the surviving devices' encoded updates (and of "
                "their counters), and nothing when fewer than "
                f"K_min={config.min_survivors} devices survive (the devices refuse to unmask); "
                "fewer than the threshold of a device's share holders collude with it; the "
                "other devices add their discrete noise honestly and do not collude with the "
                "server. In the Flower simulation each execution slot is one SecAgg+ "
                "party holding the sum of its devices' encodings (their noise shares drawn "
                "as one, at least as close to the summed discrete Gaussian the accountant "
                "assumes): the server receives every slot's sum masked, unmasks only the "
                "total, and a slot refuses to unmask unless the survivors hold K_min "
                "devices; in-process, every device is its own party. Not covered: the summed "
                "counters (declined, trained, retired, losses, prequential hits, an epsilon "
                "histogram), released exactly as the study's instrumentation, a failed "
                "device's error message, and the malicious-server variant of SecAgg+",
                "epsilon": float(eps_distributed.max()) if len(eps_distributed) else 0.0,
                "delta": delta,
                "accountant": "RDP of the summed discrete Gaussian at n = K_min per cohort "
                "from the device ledgers (ddg mechanism entries)",
            }
        )
    elif config.distributed_holds:
        out.append(
            {
                "name": "per-interaction DP against the server, with secure aggregation",
                "unit": "one interaction (add/remove; each is in one training example)",
                "threat_model": "an honest-but-curious server that sees only the sum of the "
                "devices' updates, and only when at least "
                f"K_min={config.min_survivors} devices reach it (secure aggregation with that "
                "threshold, assumed in simulation); the other devices add their noise honestly "
                "and do not collude with the server. Every device's noise and every "
                "interaction's contribution are in one unit (lr*C/B), so the sum carries "
                "sigma*sqrt(K_min) for each interaction in it. The simulated server gets, per "
                "device, only whether it failed; updates and counters arrive as one sum. Not "
                "covered: those counters (declined, trained, retired, losses, prequential "
                "hits, an epsilon histogram), exact sums released as the study's "
                "instrumentation, and a failed device's error message. Simulation only: "
                "the secure sum is simulated, and the server process receives each "
                "execution slot's partial sum (fewer than K_min devices) before adding "
                "them, so the guarantee assumes a server that reads only the total; it "
                "holds against a server that reads more only with real secure "
                "aggregation. A discarded round's row says only that it was discarded "
                "and how many devices answered",
                "epsilon": float(eps_distributed.max()) if len(eps_distributed) else 0.0,
                "delta": delta,
                "accountant": "RDP per cohort from the device ledgers",
            }
        )
    elif "distributed" in config.dp:
        out.append(
            _not_per_interaction(
                "per-interaction DP against the server, with secure aggregation", delta
            )
        )
    if config.device_noise_multiplier is not None and not config.per_interaction_holds:
        out.append(
            _not_per_interaction("per-interaction local DP (the device's own noise only)", delta)
        )
    elif config.device_noise_multiplier is not None:
        out.append(
            {
                "name": "per-interaction local DP (the device's own noise only)",
                "unit": "one interaction",
                "threat_model": "anyone, the server included, seeing the content of a "
                "device's update; no trust. Not covered: whether the device trained or "
                "declined in a round (a device with nothing left to train declines in the "
                "clear, so the presence of its only untrained interaction shows through its "
                "participation), and the per-device metrics the simulation reports",
                "epsilon": float(eps_local.max()) if len(eps_local) else 0.0,
                "delta": delta,
                "accountant": "RDP per cohort from the device ledgers",
            }
        )
    return [void_unless_delta_holds(g, delta, run) for g in out]


def void_unless_delta_holds(guarantee: dict, target_delta: float, run: FederatedRun) -> dict:
    """A guarantee is stated as held only when its δ is at most the run's target and below
    1/N for its unit (devices for user-level DP, delivered interactions otherwise): a larger δ
    permits releasing some unit's data outright, so the (ε, δ) pair would say nothing."""
    if guarantee.get("earned") is False:
        return guarantee
    user_level = guarantee["unit"].startswith("one device")
    population = len(run.registered) if user_level else len(run.stream.rows)
    what = "devices" if user_level else "interactions"
    why = None
    if not guarantee["delta"] <= target_delta:
        why = f"δ={guarantee['delta']:.3g} exceeds the target δ={target_delta:g}"
    elif not guarantee["delta"] < 1 / population:
        why = f"δ={guarantee['delta']:.3g} is not below 1/N for the {population} {what}"
    if why is None:
        return {**guarantee, "earned": True}
    return {**guarantee, "earned": False, "why_not": f"void: {why}"}


def prequential_baselines(run: FederatedRun) -> list[dict]:
    """Popularity (all earlier windows) and recent popularity (the previous window) ranking each
    window's interactions from the user's earlier history: the yardstick for the prequential
    metrics, computed like them (full ranking, earlier items excluded)."""
    stream = run.stream
    rows, out = stream.rows, []
    for r in range(1, stream.num_rounds):
        before = rows.select(stream.window < r)
        history = UserHistories.from_interactions(before, stream.dataset.num_users)
        test = rows.select(stream.window == r)
        num_items = stream.dataset.num_items
        previous = rows.select(stream.window == r - 1)
        scorers = {
            "popularity": popularity_scorer(before, num_items),
            "recent_popularity": popularity_scorer(previous, num_items),
        }
        row: dict = {"round": r + 1}
        for name, scorer in scorers.items():
            metrics = evaluate(
                scorer, test=test, history=history, num_items=num_items, sampled_negatives=0
            )
            row[name] = metrics["ndcg@10"]
        out.append(row)
    return out


def finalize(run: FederatedRun) -> dict:
    """Evaluate, state the privacy guarantees, write summary.json and the plots."""
    config = run.config
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    ledgers = client_epsilons(run)
    test, ranks = run.rank_and_evaluate()
    baselines = baseline_metrics(
        run.stream.split, run.stream.dataset.num_users, run.stream.dataset.num_items
    )
    preq_baselines = prequential_baselines(run)
    robust = robustness(run, rows, ranks)
    spent = ledgers()
    eps_dist, eps_local, retired, heads = spent.distributed, spent.local, spent.retired, spent.heads
    budgeted = eps_dist if config.distributed_holds else eps_local
    privacy = {
        "budget_epsilon": config.epsilon,
        "delta": config.delta,
        "max_interaction_epsilon": float(budgeted.max()) if len(budgeted) else 0.0,
        "max_interaction_epsilon_local": float(eps_local.max()) if len(eps_local) else 0.0,
        # False: the two figures above are ledger bookkeeping, not guarantees (see guarantees)
        "per_interaction_holds": config.per_interaction_holds,
        "retired_cohorts": retired,
        "declined_clients": int(sum(r.get("declined", 0) for r in rows)),
        "failed_clients": int(sum(r["failed"] for r in rows)),
        "guarantees": guarantees(run, eps_dist, eps_local),
    }
    if config.reproducible_noise:  # the noise is in config.json: nothing above holds
        privacy["guarantees"] = []
        privacy["void_reason"] = VOID_REASON
    if "user" in config.dp:
        privacy["user_epsilon"] = run.accountant.epsilon(run.user_delta)
        privacy["user_budget_epsilon"] = config.user_epsilon
    summary = {
        "rounds": len(rows),
        # rounds whose sum was published (the others were discarded below K_min)
        "published_rounds": sum(not r.get("discarded") for r in rows),
        "protocol": config.protocol,
        # "test", or "validation" when the run chooses settings (the test is then never read)
        "evaluated_on": config.evaluate_on,
        config.evaluate_on: test,
        # the same target, ranked by the non-personalised yardsticks (as `fedrec train` reports)
        f"{config.evaluate_on}_baselines": baselines,
        # the least a recommender must do: rank better than the same list for everyone
        "yardstick": {
            "name": "popularity",
            "ndcg@10": baselines["popularity"]["ndcg@10"],
            "beaten": test["ndcg@10"] > baselines["popularity"]["ndcg@10"],
        },
        "dp": {
            "mode": format_dp(config.dp),
            "device_noise_multiplier": config.device_noise_multiplier,
            "aggregate_noise_multiplier": config.aggregate_noise_multiplier,
            "min_survivors": config.min_survivors,
            "clip_norm": config.clip_norm,
            "user_noise_multiplier": run.noise_multiplier,
            "user_server_noise_multiplier": run.server_noise_multiplier,
            "user_noise_from_devices": config.user_noise_from_devices,
            "user_sensitivity": config.user_sensitivity,
            "client_sample_rate": run.sample_rate,
        },
        "privacy": privacy,
        "prequential": [
            {"round": r["round"], "hr@10": r.get("preq_hr@10"), "ndcg@10": r.get("preq_ndcg@10")}
            for r in rows
        ],
        "prequential_baselines_ndcg@10": preq_baselines,
        # forgetting: NDCG@10 on window 2 (from window-1 histories), re-measured every round
        "early_window_ndcg@10": [r.get("early_window_ndcg@10") for r in rows],
        "robustness": robust,
        "config": config.to_flat(),
    }
    # head hashes of the ledgers that hold entries, in their own file (an auditor compares
    # them with the ledgers; most of a large run's summary was this list)
    atomic_write_json(run.out / LEDGER_HEADS_FILE, heads)
    plot_rounds(rows, run.out / "rounds.png")
    plot_epsilons(budgeted, config.epsilon, run.out / "epsilon.png")
    # last: a new summary.json means the whole report is written (the launcher stops there)
    atomic_write_json(run.out / "summary.json", summary)
    return summary


def robustness(run: FederatedRun, rows: list[dict], ranks: Ranks) -> dict:
    """The attack's measures, in every run (a clean run gives the values to compare with):
    ER@10 of the promotion targets over the benign users (those the attack's draw leaves
    honest) and the benign users' NDCG@10 on the evaluated rows (from `ranks`, the run's
    ranking of those rows), with the rounds' refused updates by kind and what bias damping
    flagged."""
    config, stream = run.config, run.stream
    benign = np.ones(stream.dataset.num_users, dtype=bool)
    benign[list(malicious_draw(config))] = False
    run.load_into_model()
    history = history_before_test(stream.split, stream.dataset.num_users)
    scorer = ModelScorer(run.model, history)
    test = stream.split.test
    benign_rows = benign[test.user]
    targets = run_targets(config)
    users = np.unique(test.user[benign_rows])
    dropped: dict[str, int] = {}
    for row in rows:
        for kind, count in (row.get("dropped_kinds") or {}).items():
            dropped[kind] = dropped.get(kind, 0) + int(count)
    return {
        "attack": config.attack,
        "malicious_share": config.malicious_share if config.attack != "none" else 0.0,
        "malicious_devices": len(malicious_draw(config)) if config.attack != "none" else 0,
        "targets": [str(stream.dataset.catalogue.item_ids[t]) for t in targets],
        "target_er@10": exposure_ratio(
            scorer, users=users, history=history, num_items=run.model.num_items, targets=targets
        ),
        "benign_users": len(users),
        "benign_ndcg@10": metrics_from_ranks(ranks.full[benign_rows])["ndcg@10"],
        "dropped_by_kind": dropped,
        "bias_flagged": int(sum(r.get("bias_flagged", 0) for r in rows)),
        "bias_capped": int(sum(r.get("bias_capped", 0) for r in rows)),
    }


def plot_rounds(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for key, label in (("preq_hr@10", "HR@10"), ("preq_ndcg@10", "NDCG@10")):
        axes[0].plot(
            rounds,
            [r[key] if r.get(key) is not None else np.nan for r in rows],
            marker="o",
            label=label,
        )
    if rows and rows[0].get("early_window_ndcg@10") is not None:
        axes[0].plot(
            rounds,
            [r["early_window_ndcg@10"] for r in rows],
            marker="s",
            label="early window NDCG@10",
        )
    axes[0].set(title="prequential (new, before training) and forgetting", xlabel="round")
    axes[1].plot(rounds, [r["aggregated"] for r in rows], marker="o", label="aggregated")
    axes[1].plot(rounds, [r.get("declined", 0) for r in rows], marker="x", label="declined")
    axes[1].set(title="devices per round", xlabel="round")
    if "user_epsilon" in rows[0]:
        axes[2].plot(rounds, [r["user_epsilon"] for r in rows], marker="o", label="user-level ε")
    if any(r.get("max_interaction_epsilon_sampled") is not None for r in rows):
        worst, label = "max_interaction_epsilon_sampled", "max per-interaction ε (sampled devices)"
    else:  # secure aggregation: a bound from the sum's histogram
        worst, label = "max_interaction_epsilon_sampled_at_most", "per-interaction ε ≤ (sampled)"
    axes[2].plot(rounds, [r.get(worst) or 0 for r in rows], marker="x", label=label)
    axes[2].set(title="privacy spent", xlabel="round")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_epsilons(values: np.ndarray, budget: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    if len(values):
        ax.hist(values, bins=30)
    ax.axvline(budget, color="red", linestyle="--", label=f"budget ε={budget:g}")
    ax.set(title="per-interaction ε of every cohort", xlabel="ε", ylabel="cohorts")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

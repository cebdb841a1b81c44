"""Canary runs for the empirical audit: data with canaries, the federated run, the scores.

The run is fedrec's own in-process federation (`run_in_process`) on a CSV dataset written
here: a synthetic dataset plus the included canaries, with a catalogue that lists every
canary item (included or not), so the data differs from a canary-free one only in the
included canaries' interactions. Nothing in the training code knows about canaries.
"""

from __future__ import annotations

import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrec.common.audit.empirical import EmpiricalConfig


@dataclass(frozen=True)
class Canaries:
    users: np.ndarray  # (m,) external user id of each canary's client
    first: np.ndarray  # (m,) a canary is a pair of fresh items (first -> second) no one else
    second: np.ndarray  # has: one training example of one client
    included: np.ndarray  # (m,) bool: the fair coin
    data: Path  # interactions.csv and items.csv

    @classmethod
    def draw(cls, config: EmpiricalConfig, folder: Path) -> Canaries:
        from fedrec.common.data.synthetic import SyntheticConfig, generate_synthetic

        rng = np.random.default_rng([config.seed, 7])
        ds = generate_synthetic(
            SyntheticConfig(
                num_users=config.num_users, num_items=config.num_items, seed=config.seed
            )
        )
        inter, cat = ds.interactions, ds.catalogue
        m = config.canaries
        users = ds.user_ids[rng.integers(0, ds.num_users, size=m)].astype(str)
        first = np.array([f"canary{j:05d}a" for j in range(m)])
        second = np.array([f"canary{j:05d}b" for j in range(m)])
        included = rng.random(m) < 0.5  # independent of everything else
        # Before every real interaction, in the first window, each canary's two interactions
        # consecutive: the device pairs them with each other (pairs form in arrival order), so
        # a canary is exactly one training example, trained from round 1.
        start = int(inter.timestamp.min()) - 2 * m - 2
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "interactions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user", "item", "time"])
            for j in np.flatnonzero(included):
                w.writerow([users[j], first[j], start + 2 * j])
                w.writerow([users[j], second[j], start + 2 * j + 1])
            for u, i, t in zip(inter.user, inter.item, inter.timestamp, strict=True):
                w.writerow([ds.user_ids[u], cat.item_ids[i], int(t)])
        words = np.array([f"zq{x:05d}" for x in range(20 * m)])  # fresh words: no shared text
        with open(folder / "items.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["item", "title", "genres"])
            for i, title, genres in zip(cat.item_ids, cat.titles, cat.genres, strict=True):
                w.writerow([i, title, genres])
            for i in [*first, *second]:
                w.writerow([i, " ".join(rng.choice(words, size=3, replace=False)), ""])
        return cls(users, first, second, included, folder)

    def analytic_epsilon(self, run, out: Path) -> float:
        """The largest ε any canary's cohort has, recomputed by the audit from the run's
        ledgers (and the user-level ε from the server's record, when that is tighter)."""
        from fedrec.common.audit import audit
        from fedrec.common.audit.recompute import Recomputer, key_of
        from fedrec.common.audit.records import server_record

        result = audit(out)
        view = "distributed" if "distributed" in run.config.dp else "local"
        clients = {c["client"]: c for c in result.figures["clients"]}
        eps = max(
            (max((e[view] for e in clients[u]["cohorts"].values()), default=0.0))
            for u in set(self.users.tolist())
            if u in clients
        )
        if "user" in run.config.dp:
            record, _ = server_record(out)
            counts: dict = {}
            for r in record["rounds"]:
                key = (r["mechanism"]["sample_rate"], r["mechanism"]["noise_multiplier"])
                counts[key] = counts.get(key, 0) + 1
            eps = min(eps, Recomputer().epsilon(key_of(counts), run.config.delta))
        return eps


def train(config: EmpiricalConfig, canaries: Canaries, dp: str, out: Path):
    """The federated run on the canary data (every client every round)."""
    from fedrec.simulations.config import SimulationConfig
    from fedrec.simulations.federation import run_in_process

    sim = SimulationConfig.from_flat(
        {
            "dataset": "csv",
            "data-dir": str(canaries.data / "interactions.csv"),
            "columns": "user=user,item=item,time=time",
            "text-encoder": "hashing",
            "rounds": config.rounds,
            "clients-per-round": config.num_users,  # every client: q = 1
            "dp": dp,
            "epsilon": config.epsilon,
            "local-noise-multiplier": config.local_noise_multiplier,
            "delta": config.delta,
            "local-lr": config.local_lr,
            "model-id-embeddings": config.id_embeddings,
            "num-negatives": config.num_negatives,
            "local-steps": config.local_steps,
            # pinned, not the simulation's defaults (tuned for the built-in data): Poisson
            # rate 0.5 keeps 4 steps at σ = 1 within ε 8, so every canary trains once
            "sample-rate": 0.5,
            "server-lr": 1.0,
            "server-bias-decay": 0.0,
            "model-bias-scale": 1.0,
            "model-time-knots": 4,
            "seed": config.seed,
            "out": str(out),
        }
    )
    data = dataclasses.replace(sim.data, items_path=str(canaries.data / "items.csv"))
    return run_in_process(dataclasses.replace(sim, data=data))


def score_canaries(run, canaries: Canaries) -> np.ndarray:
    """Membership score of each canary from the final global model alone: how much training
    raised the model's logit of its second item after its first. The initial global model is
    public (seeded), so its logit is subtracted: what is left is what the data moved."""
    from fedrec.client.runtime import build_model

    stream, now = run.stream, int(run.stream.window_end[-1])
    index = {str(x): i for i, x in enumerate(stream.dataset.catalogue.item_ids)}
    a = np.array([index[i] for i in canaries.first])
    b = np.array([index[i] for i in canaries.second])
    run.load_into_model()
    initial = build_model(run.config.data, run.config.model, stream)
    return _pair_logits(run.model, a, b, now) - _pair_logits(initial, a, b, now)


def _pair_logits(model, a: np.ndarray, b: np.ndarray, now: int) -> np.ndarray:
    import torch

    model.eval()
    with torch.no_grad():
        vecs, bias = model.item_vectors(now)
        ctx = model.all_context_vectors()
    return ((ctx[a] * vecs[b]).sum(dim=1) + bias[b]).numpy()

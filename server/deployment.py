"""The server side of a deployed run: the simulation's `FederatedRun` over real devices.

The same validation, aggregation, user-level accounting and per-round checkpoints as the
simulation (`fedrec.server.federated_run.FederatedRun`, and its loop `run_rounds`); what
differs is only who the devices are: the SuperNodes connected now (each one device,
authenticated by its key) instead of virtual users of a stream. The transport is a callable, so this file does not import Flower.

Restart: the run folder's latest checkpoint holds the global model, the optimizer state and the
user-level accountant; a new run over the same folder continues with the next round number.
Per-interaction spend lives in each device's ledger and is written by the device before it
replies, so a round the server loses is never lost on the device, and a round repeated after a
restart is a new release the device records once more (counted once per release).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedrec.common.deployment import DeploymentSettings
from fedrec.common.io import atomic_write_json
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.common.secagg.round_params import per_round_target
from fedrec.server.federated_run import RESUMABLE_SETTINGS, FederatedRun, run_rounds
from fedrec.server.user_privacy import client_sample_rate

# send(nodes, params, round) -> one (reply, reason it declined or None) per node (an error
# reply for a node that did not answer in time); nodes() -> the node ids connected now
Send = Callable[[Sequence[int], dict[str, np.ndarray], int], list[tuple[DeviceReply, str | None]]]
Nodes = Callable[[], list[int]]

SECURE_AGGREGATION_NOTE = (
    "no secure aggregation: the server sees each device's update, so the per-interaction "
    "guarantee against the server is the device's own (LOCAL) noise"
)


class UnsupportedDeployment(ValueError):
    pass


class DeploymentRun(FederatedRun):
    """A FederatedRun whose registered devices are the connected SuperNodes."""

    # A deployment learns for its whole life: a restart may extend it by more rounds (no
    # stream is cut into windows; the user-level accountant records each round's own
    # mechanism and the budget check stops before the user-level budget is passed).
    resumable_settings = RESUMABLE_SETTINGS | {"rounds"}

    def __init__(self, config: SimulationConfig):
        if "distributed" in config.dp and not config.secagg:
            raise UnsupportedDeployment(
                "dp 'distributed' needs secure aggregation: set secure-aggregation-protocol = "
                '"secagg" (SecAgg+ with the distributed discrete Gaussian, see README, '
                'Deployment); with "clear" the server would see each device\'s update, so '
                "use 'local' (+user) instead"
            )
        if config.reproducible_noise:
            raise UnsupportedDeployment(
                "reproducible-noise derives DP noise from the recorded seed: it is for "
                "simulations, tests and benchmarks, never a deployment"
            )
        super().__init__(config)
        self.probe = None  # the simulation's forgetting probe reads users' data: not here
        self.registered = np.zeros(0, dtype=np.int64)

    def use_nodes(self, nodes: Sequence[int]) -> None:
        """The devices a round samples from; user-level noise recalibrated when their number
        changes (the accountant records each round's own mechanism, so the spend stays exact)."""
        nodes = np.array(sorted(int(n) for n in nodes), dtype=object)
        if len(nodes) == len(self.registered) and (nodes == self.registered).all():
            return
        self.registered = nodes
        self.sample_rate = client_sample_rate(
            expected_clients=min(self.config.clients_per_round, len(nodes)),
            registered_clients=len(nodes),
        )
        self.nodes_known = True
        self.user_delta = self.config.delta - self.discard_delta_allowance()
        self.calibrate_user_noise()

    def discard_delta_allowance(self) -> float:
        """Checked against the connected devices (`use_nodes`), not the dataset's users: before
        they are known, nothing is set aside."""
        if not getattr(self, "nodes_known", False):
            return 0.0
        return super().discard_delta_allowance()

    def device_name(self, user: int) -> str:
        return str(user)  # the node: its ledger lives on the device, not in the run folder


def wait_for_nodes(nodes: Nodes, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(nodes())
        if len(found) >= minimum:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(found)} of {minimum} devices connected in {timeout:.0f}s"
            )
        time.sleep(poll)


def run_deployment(
    config: SimulationConfig,
    settings: DeploymentSettings,
    nodes: Nodes,
    send: Send,
    on_round: Callable[[dict], None] | None = None,
) -> DeploymentRun:
    """Every pending round: wait for devices, sample, send, aggregate, checkpoint, report."""
    run = DeploymentRun(config)
    # what each sampled node answered this round, with the reason it declined: `send` gives
    # both, and devices.jsonl records them once the round is finished
    answered: list[tuple[DeviceReply, str | None]] = []

    def wait_for_devices(round_: int) -> None:
        run.use_nodes(wait_for_nodes(nodes, settings.min_nodes, settings.wait_nodes_s))

    def send_round(round_: int, sampled: list[int], params: dict[str, np.ndarray]):
        answered[:] = send(sampled, params, round_) if sampled else []
        return [reply for reply, _ in answered]

    def finished(row: dict) -> None:
        record_devices(run, row["round"], answered, secure=config.secagg)
        if on_round is not None:
            on_round(row)

    run_rounds(run, send_round, before_round=wait_for_devices, on_round=finished)
    write_summary(run)
    return run


def record_devices(
    run: FederatedRun,
    round: int,
    answered: Sequence[tuple[DeviceReply, str | None]],
    *,
    secure: bool = False,
) -> None:
    """devices.jsonl: per round, every sampled device's outcome (with the reason it declined,
    failed or was dropped by the server) and how many devices' updates survived into the sum.
    Under SecAgg+ (`secure`) a device "sent" its masked input and the sum is the pooled
    reply's (none: the round was aborted, "summed" 0)."""
    outcomes = []
    pooled = [r for r, _ in answered if r.pooled]
    for r, declined in answered:
        if r.pooled:
            continue
        sent = not declined if secure else r.params is not None
        outcome = "failed" if r.error else ("sent" if sent else "declined")
        verdict = run.dropped_devices.get(r.user) if outcome == "sent" else None
        if verdict is not None:  # sent, but the server refused it (`FederatedRun.finish_round`)
            outcome = "dropped"
        entry: dict[str, Any] = {"node": str(r.user), "outcome": outcome}
        if r.error or declined or verdict:
            entry["reason"] = r.error or declined or verdict
        if r.ledger_head:
            entry["ledger_head"] = r.ledger_head
        for key in (
            "max_interaction_epsilon",
            "seconds",
            "message_seconds",
        ):  # seconds: if the device shares it
            if key in r.metrics:
                entry[key] = r.metrics[key]
        outcomes.append(entry)
    sent = sum(o["outcome"] == "sent" for o in outcomes)
    if secure:
        sent = sum(r.pooled for r in pooled)
    with open(run.out / "devices.jsonl", "a") as f:
        f.write(json.dumps({"round": round, "summed": sent, "devices": outcomes}) + "\n")


def secagg_guarantee(run: FederatedRun) -> dict:
    """The per-interaction guarantee of a deployment under SecAgg+: the mechanism the devices
    ran, the ε one round costs an interaction at K_min survivors (the calibration target each
    device's ledger charges), and the threat model (README, Deployment)."""
    config, ddg = run.config, run.ddg_params
    return {
        "name": "per-interaction DP against the server, with secure aggregation (SecAgg+)",
        "unit": "one interaction (add/remove; each is in one training example)",
        "mechanism": "distributed discrete Gaussian under SecAgg+ (Kairouz, Liu & Steinke "
        f"2021; Bell et al. 2020): each device N_Z(0, {ddg.sigma:.6g}^2) per coordinate at "
        f"granularity {ddg.gamma:.4g}, mod 2^{ddg.bits}, over {ddg.padded_dim} rotated "
        "coordinates",
        "threat_model": "an honest-but-curious server that sees only the modular sum of the "
        "surviving devices' encoded updates and counters, and nothing when fewer than "
        f"K_min={config.min_survivors} survive (each device refuses to unmask below it); "
        "fewer than the threshold of a device's share holders collude with the server; "
        "devices add their discrete noise honestly. Not covered: a malicious server (it "
        "could announce inconsistent survivor sets to different devices), the summed "
        "counters, a failed device's error message",
        "epsilon_per_round": per_round_target(
            aggregate_noise_multiplier=config.aggregate_noise_multiplier,
            sample_rate=config.sample_rate,
            steps=config.local_steps,
            delta=config.delta,
        ),
        "delta": config.delta,
        "accountant": "each device's ledger: RDP of the summed discrete Gaussian at n = K_min "
        "(ddg mechanism entries; `fedrec audit STORE --guarantee distributed`)",
    }


def write_summary(run: FederatedRun) -> dict:
    rows = [json.loads(line) for line in (run.out / "metrics.jsonl").read_text().splitlines()]
    if run.config.secagg:
        guarantees = [secagg_guarantee(run)]
    else:
        guarantees = [
            {
                "name": "per-interaction DP of each device's update (the device's own noise)",
                "unit": "one interaction",
                "threat_model": "anyone who sees the device's update, the server included; "
                "enforced by each device's own policy and ledger (`fedrec client status`)",
                "note": SECURE_AGGREGATION_NOTE,
            }
        ]
    if run.user_dp:
        guarantees.append(
            {
                "name": "user-level DP of the published global model",
                "unit": "one device",
                "threat_model": "anyone who sees a published model; trusts the server",
                "epsilon": run.accountant.epsilon(run.user_delta),
                "delta": run.user_delta,
            }
        )
    summary = {
        "rounds": [r["round"] for r in rows],
        "summed_per_round": {r["round"]: r["aggregated"] for r in rows},
        # a discarded round has no counters: they are part of the sum it did not reveal
        "declined": int(sum(r.get("declined", 0) for r in rows)),
        "failed": int(sum(r["failed"] for r in rows)),
        "secure_aggregation": "secagg" if run.config.secagg else False,
        "discarded_rounds": [r["round"] for r in rows if r.get("discarded")],
        "privacy": {"guarantees": guarantees},
    }
    atomic_write_json(run.out / "summary.json", summary)
    return summary

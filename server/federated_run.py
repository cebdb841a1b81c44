"""The server side of a federated lifelong run, as plain code that a transport only carries.

`FederatedRun` owns the global model, the server optimizer, the user-level accountant and the
run folder. Per round: `sample(round)` Poisson-samples devices; the transport (Flower's Grid in
a simulation or a deployment, or the simulation's in-process loop for tests and baselines)
delivers each one `global_params` and brings back a `DeviceReply`; `finish_round(round,
replies)` validates, aggregates, accounts, checkpoints and logs. The order inside
`finish_round` is the privacy argument for user-level DP: the accountant's record is persisted
(in the checkpoint) before the new model is published. `run_rounds` is the one loop over the
rounds that every transport drives.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from fedrec.common.data.history import UserHistories
from fedrec.common.data.stream import load_stream
from fedrec.common.evaluation import Ranks, evaluate
from fedrec.common.io import atomic_write_json
from fedrec.common.model import ModelScorer, served_bias_weights
from fedrec.common.privacy.accounting import DiscreteGaussian
from fedrec.common.privacy.randomness import VOID_REASON, privacy_randomness
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig, format_dp
from fedrec.common.run_model import build_model, global_parameters, load_parameters
from fedrec.common.secagg.encoding import DDGParams
from fedrec.common.train import rank_and_evaluate_model
from fedrec.server.aggregation import (
    AggregationDiagnostics,
    ClientUpdate,
    ServerOptConfig,
    aggregate,
    check_reply_fields,
    init_server_state,
)
from fedrec.server.checkpoint import load_latest, save_checkpoint
from fedrec.server.robustness import BiasDamping, cap_bias_change, damp_bias_jumps, robust_delta
from fedrec.server.round_replies import RoundReplies, collect_updates
from fedrec.server.run_record import (
    PARTICIPATION_FILE,
    RECORD_KEY,
    ParticipationLog,
    record_attempt,
    round_record,
)
from fedrec.server.secure_aggregation import epsilon_bound
from fedrec.server.user_privacy import (
    UserLevelAccountant,
    aggregate_noise_std,
    calibrate_noise_multiplier,
    client_sample_rate,
    discard_delta,
    discard_probability,
    discrete_user_level,
    largest_min_survivors,
    user_level_mechanism,
)

log = logging.getLogger(__name__)


class RunExistsError(RuntimeError):
    pass


class ModelNotFiniteError(RuntimeError):
    """The aggregated model stopped being finite: the run stops rather than publish it."""


class SettingsError(ValueError):
    """A configuration under which a stated guarantee would be void, or no round could be
    aggregated: refused before anything is delivered or trained. Names the flags to change."""


# A round under secure aggregation may be discarded (fewer than K_min survivors) at most this
# often; more and the run would mostly publish nothing while devices still spend their budgets.
MAX_DISCARD_PROBABILITY = 0.01


def tolerable_discard_probability(config: SimulationConfig) -> float:
    """How often a round may be discarded below K_min: at most MAX_DISCARD_PROBABILITY, and
    little enough that the discard rule's user-level δ (`discard_delta`, at most
    R·(1 + e^ε)·P) stays within a tenth of the target δ."""
    user_eps = min(config.user_epsilon, 700)
    return min(
        MAX_DISCARD_PROBABILITY, config.delta / (10 * config.rounds * (1 + math.exp(user_eps)))
    )


def check_guarantees_can_hold(
    config: SimulationConfig, *, registered: int, interactions: int
) -> float:
    """Refuse settings under which a guarantee the run would state is void; return the δ that
    discarding rounds below K_min adds to the user-level guarantee (0 without it).

    - Under secure aggregation, a round is discarded when fewer than K_min devices reach the
      sum; with N registered devices sampled at rate q, that must stay improbable.
    - δ must be below 1/N of the guarantee's unit: devices for user-level DP, interactions
      for per-interaction DP (a larger δ allows releasing one unit's data outright).
    - The discard rule's extra user-level δ must fit well inside the target δ (at most a tenth):
      the accountant is calibrated for what is left, so the stated total is at most the target.
    """
    sample_rate = client_sample_rate(
        expected_clients=min(config.clients_per_round, registered), registered_clients=registered
    )
    expected = sample_rate * registered
    if "user" in config.dp and config.delta >= 1 / registered:
        raise SettingsError(
            f"--delta {config.delta:g} is not below 1/N = {1 / registered:.3g} for the "
            f"{registered} devices of this dataset: user-level DP would be void; lower --delta"
        )
    per_interaction = config.device_noise_multiplier is not None
    if per_interaction and config.delta >= 1 / max(interactions, 1):
        raise SettingsError(
            f"--delta {config.delta:g} is not below 1/N = {1 / max(interactions, 1):.3g} for the "
            f"{interactions} interactions of this dataset: per-interaction DP would be void; "
            "lower --delta"
        )
    if not config.secure_aggregation:
        return 0.0
    p_discard = discard_probability(
        registered_clients=registered,
        sample_rate=sample_rate,
        min_survivors=config.min_survivors,
    )
    suggested = largest_min_survivors(
        registered_clients=registered,
        sample_rate=sample_rate,
        max_discard_probability=tolerable_discard_probability(config),
    )
    if (
        suggested < 1
        and discard_probability(
            registered_clients=registered, sample_rate=sample_rate, min_survivors=1
        )
        <= MAX_DISCARD_PROBABILITY
    ):
        suggested = 1  # K_min = 1 discards only empty rounds, which `discard_delta` charges 0
    advice = (
        f"set --min-survivors to at most {suggested}"
        if suggested >= 1
        else "sample more devices per round (--clients-per-round)"
    )
    if p_discard > MAX_DISCARD_PROBABILITY:
        raise SettingsError(
            f"--min-survivors {config.min_survivors} (K_min) cannot be reached: {registered} "
            f"devices are registered and about {expected:.0f} are sampled per round "
            f"(--clients-per-round {config.clients_per_round}), so a round would be discarded "
            f"with probability {p_discard:.3g} and the run would publish nothing; {advice}"
        )
    if "user" not in config.dp:
        return 0.0
    extra = discard_delta(
        epsilon=config.user_epsilon,
        rounds=config.rounds,
        registered_clients=registered,
        sample_rate=sample_rate,
        min_survivors=config.min_survivors,
    )
    if extra > config.delta / 10:
        raise SettingsError(
            f"--min-survivors {config.min_survivors} (K_min) is too close to the {expected:.0f} "
            f"devices expected per round: discarding rounds below it adds up to δ={extra:.3g} "
            f"to user-level DP, more than a tenth of --delta {config.delta:g}; {advice}"
        )
    return extra


# Settings a resumed run may change: where it runs, and the resume flag itself. Everything
# else shapes the stream, the model, the privacy calibration or the budgets.
RESUMABLE_SETTINGS = frozenset({"out", "resume"})


def refuse_changed_settings(
    recorded: dict,
    config: SimulationConfig,
    path: Path,
    resumable: frozenset[str] = RESUMABLE_SETTINGS,
) -> None:
    """A resumed run continues the recorded one exactly: any other setting that differs is
    refused, naming each (a raised budget, another DP mode or other rounds would make the
    spend, the ledgers or the stream mean something else)."""
    try:
        before = SimulationConfig.from_flat(recorded).to_flat()
    except (TypeError, ValueError) as err:
        raise SettingsError(f"{path}: unreadable recorded configuration: {err}") from err
    now = config.to_flat()
    changed = [
        f"{key} (recorded {before[key]!r}, now {now[key]!r})"
        for key in sorted(before)
        if key not in resumable and before[key] != now.get(key)
    ]
    if changed:
        raise SettingsError(
            f"--resume continues the run recorded in {path} with its own settings; these "
            f"differ: {'; '.join(changed)}. Resume without changing them, or start a new run "
            "in another --out"
        )


def check_defences(config: SimulationConfig) -> None:
    """Defences that read each device's update need a server that sees it, and a sum whose
    sensitivity no noise was calibrated to: refused otherwise, naming what holds instead."""
    per_update = config.robust_aggregation != "off" or config.row_clip_norm > 0
    if per_update and (config.secure_aggregation or "user" in config.dp):
        raise SettingsError(
            f"robust-aggregation / row-clip-norm with dp = {format_dp(config.dp)}: they read "
            "each device's update, which secure aggregation hides, and change the sum whose "
            "sensitivity user-level noise is calibrated to; use them with dp = off or local "
            "(bias-change-cap and bias-anomaly hold under every dp)"
        )


def preflight(config: SimulationConfig) -> None:
    """Load the run's stream and check its settings before anything starts (Flower included)."""
    check_defences(config)
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    check_guarantees_can_hold(
        config, registered=len(stream.clients()), interactions=len(stream.rows)
    )
    if config.secagg:
        params = global_parameters(build_model(config.data, config.model, stream))
        check_ddg_params(config, sum(int(v.size) for v in params.values()))


def check_ddg_params(config: SimulationConfig, dim: int) -> DDGParams:
    """The run's discrete mechanism, or SettingsError when none is accurate enough to state."""
    try:
        return config.ddg_params(dim)
    except ValueError as err:
        raise SettingsError(
            f"secure-aggregation-protocol = secagg: {err}; raise --min-survivors or lower "
            "aggregate-noise-multiplier"
        ) from err


class FederatedRun:
    # what a resumed run may change (`refuse_changed_settings`)
    resumable_settings = RESUMABLE_SETTINGS

    def __init__(self, config: SimulationConfig):
        self.config = config
        check_defences(config)
        self.out = Path(config.out)
        recorded = self.out / "config.json"
        if config.resume and recorded.exists():
            refuse_changed_settings(
                json.loads(recorded.read_text()), config, recorded, self.resumable_settings
            )
        self.stream = load_stream(config.data, config.rounds, config.stream_protocol)
        self.model = build_model(config.data, config.model, self.stream)
        self.registered = self.stream.clients()
        self.sample_rate = client_sample_rate(
            expected_clients=min(config.clients_per_round, len(self.registered)),
            registered_clients=len(self.registered),
        )
        self.opt_config = ServerOptConfig(name=config.server_optimizer, lr=config.server_lr)
        self.user_dp = "user" in config.dp
        if config.reproducible_noise:
            log.warning("reproducible-noise is on: %s", VOID_REASON)
        # user-level noise multipliers: `noise_multiplier` is what every published sum carries
        # (and what the accountant charges); the server adds `server_noise_multiplier` on top
        # of the devices' own noise (SimulationConfig.user_noise_from_devices)
        # δ the user-level accountant may use: the target less what discarding rounds below
        # K_min can add (`discard_delta`), so the stated total never exceeds the target
        self.user_delta = config.delta - self.discard_delta_allowance()
        self.noise_multiplier = self.server_noise_multiplier = 0.0
        self.calibrate_user_noise()
        checkpoint = load_latest(self.out) if (self.out / "checkpoints").exists() else None
        if checkpoint is not None and not config.resume:
            raise RunExistsError(
                f"{self.out} already holds a run (round {checkpoint.round}): "
                "pass --resume to continue it, or choose another --out"
            )
        if checkpoint is None:
            self.params = global_parameters(self.model)
            self.opt_state = init_server_state(self.params, self.opt_config)
            self.accountant = UserLevelAccountant()
            self.next_round = 1
        else:
            self.params, self.opt_state = checkpoint.params, checkpoint.opt_state
            self.accountant = UserLevelAccountant.from_dict(checkpoint.extra["user_privacy"])
            self.next_round = checkpoint.round + 1
        self.update_bound = config.update_norm_bound(sum(v.size for v in self.params.values()))
        if config.secagg:
            check_ddg_params(config, sum(int(v.size) for v in self.params.values()))
        self.out.mkdir(parents=True, exist_ok=True)
        if not recorded.exists():  # written once: a resumed run never rewrites it
            atomic_write_json(recorded, config.to_flat())
        self.probe = self._early_window_probe()
        self.damping: BiasDamping | None = None  # what bias damping did in the last round

    def discard_delta_allowance(self) -> float:
        """`check_guarantees_can_hold` over the registered devices: the δ that discarding
        rounds below K_min may add (SettingsError when K_min is out of reach)."""
        return check_guarantees_can_hold(
            self.config, registered=len(self.registered), interactions=len(self.stream.rows)
        )

    def calibrate_user_noise(self) -> None:
        self.user_ddg: DiscreteGaussian | None = None
        if not self.user_dp:
            return
        if self.config.secagg:
            # the devices' discrete noise alone, when it pays for every planned round: the
            # server then adds none (else it adds all, and the discrete noise is not counted)
            dim = sum(int(v.size) for v in global_parameters(self.model).values())
            ddg = self.config.discrete_mechanism(dim)
            planned = UserLevelAccountant()
            mechanism = discrete_user_level(
                ddg,
                sample_rate=self.sample_rate,
                min_survivors=self.config.min_survivors,
                delta=self.user_delta,
            )
            for r in range(self.config.rounds):
                planned.record_round(mechanism, round=r + 1)
            if planned.epsilon(self.user_delta) <= self.config.user_epsilon:
                self.user_ddg = ddg
                return
        needed = calibrate_noise_multiplier(
            target_epsilon=self.config.user_epsilon,
            delta=self.user_delta,
            sample_rate=self.sample_rate,
            rounds=self.config.rounds,
        )
        from_devices = self.config.user_noise_from_devices
        self.noise_multiplier = max(needed, from_devices)
        self.server_noise_multiplier = math.sqrt(max(0.0, needed**2 - from_devices**2))

    def _early_window_probe(self):
        """Forgetting probe: the second window's interactions, each ranked from the history its
        user had in the first window, re-measured after every round at that window's time."""
        stream = self.stream
        if stream.num_rounds < 3:
            return None
        rows = stream.rows
        history = UserHistories.from_interactions(
            rows.select(stream.window == 0), stream.dataset.num_users
        )
        return rows.select(stream.window == 1), history, int(stream.window_end[1])

    def early_window_ndcg(self) -> float | None:
        if self.probe is None:
            return None
        test, history, when = self.probe
        self.load_into_model()
        metrics = evaluate(
            ModelScorer(self.model, history, now=when),
            test=test,
            history=history,
            num_items=self.model.num_items,
            sampled_negatives=0,
        )
        return metrics["ndcg@10"]

    # -- per round ------------------------------------------------------------------------------
    def pending_rounds(self) -> range:
        return range(self.next_round, self.config.rounds + 1)

    def user_mechanism(self):
        if self.user_ddg is not None:
            return discrete_user_level(
                self.user_ddg,
                sample_rate=self.sample_rate,
                min_survivors=self.config.min_survivors,
                delta=self.user_delta,
            )
        return user_level_mechanism(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            clip_norm=self.config.user_sensitivity,
            delta=self.user_delta,
        )

    def budget_allows_next_round(self) -> bool:
        if not self.user_dp:
            return True
        return not self.accountant.would_exceed(self.config.user_epsilon, self.user_mechanism())

    def sample(self, round: int) -> np.ndarray:
        """Poisson sampling: each registered device joins independently with rate q (the
        user-level accountant's assumption, which needs the sample to be secret: a CSPRNG,
        `privacy_randomness`). A resumed run samples its rounds afresh: the accountant charges
        only published rounds, each under its own sample."""
        source = privacy_randomness(self.config.noise_seed, "sample", round)
        return self.registered[source.bernoulli(len(self.registered), self.sample_rate)]

    def begin_round(self, round: int) -> np.ndarray:
        """The round's sample (`sample`), recorded as an attempt at the round before any device
        is asked (`fedrec.server.run_record`, attempts.jsonl): a crash may cut the round short
        after devices charged their ledgers for it."""
        users = self.sample(round)
        record_attempt(self.out, round, [self.device_name(int(u)) for u in users])
        return users

    def finish_round(self, round: int, replies: Sequence[DeviceReply], seconds: float) -> dict:
        """Validate the round's replies, aggregate them (or discard the round below K_min),
        account for it, and commit it: the checkpoint, with the accountant's record, is
        written before the round's row and model are published."""
        collected = collect_updates(
            round,
            replies,
            self.params,
            secure=self.config.secure_aggregation,
            update_bound=self.update_bound,
        )
        self.dropped_devices = collected.dropped_devices
        discarded = self._discards(round, collected)
        before = self.params
        diag = None if discarded else self._aggregate(round, collected.updates)
        self.damping = None if discarded else self._damp_item_biases(before)
        if not discarded and self.config.server_bias_decay > 0:
            self._decay_item_biases(self.config.server_bias_decay)
        self._refuse_non_finite(round)
        if self.user_dp:
            self.accountant.record_round(self.user_mechanism(), round=round)
        row = self._metrics_row(round, collected, discarded, diag, seconds)
        self._commit(round, collected, discarded, row)
        return row

    def _discards(self, round: int, collected: RoundReplies) -> bool:
        """Secure aggregation with threshold K_min: fewer survivors and the server learns
        nothing of the round (SecAgg+ cannot unmask), so the model stays as it was and the
        devices' per-interaction charge (planned at K_min) is an over-count, never an
        under-count. Idle devices send noise, so n does not depend on anyone's data; it can
        still flip with one user's participation, which user-level DP pays for in δ
        (`discard_delta`), negligible when q·N >> K_min."""
        if not (self.config.secure_aggregation and collected.survivors < self.config.min_survivors):
            return False
        log.warning(
            "round %d: %d survivors < K_min=%d: discarded (only that is revealed), the model stays",
            round,
            collected.survivors,
            self.config.min_survivors,
        )
        return True

    def _aggregate(self, round: int, updates: list[ClientUpdate]) -> AggregationDiagnostics:
        """The server step on the round's valid updates; under user-level DP or secure
        aggregation a plain sum over a fixed denominator, with the server's share of the
        user-level noise."""
        if not (self.user_dp or self.config.secure_aggregation):
            if self.config.robust_aggregation != "off" or self.config.row_clip_norm > 0:
                updates = [self._robust_update(updates)] if updates else []
            self.params, self.opt_state, diag = aggregate(
                self.params, updates, opt_cfg=self.opt_config, opt_state=self.opt_state
            )
            return diag
        # Example weights would scale each device's noise differently (no common unit for the
        # sum's σ) and reveal its example count.
        expected = self.sample_rate * len(self.registered)
        noise_std = 0.0
        if self.user_dp:
            noise_std = aggregate_noise_std(
                noise_multiplier=self.server_noise_multiplier,
                clip_norm=self.config.user_sensitivity,
                expected_clients=expected,
            )
        self.params, self.opt_state, diag = aggregate(
            self.params,
            updates,
            weighting="uniform",
            user_clip_norm=None,  # bounded on the device: see SimulationConfig.user_sensitivity
            denominator=expected,
            noise_std=noise_std,
            rng=privacy_randomness(self.config.noise_seed, "user-noise", round),
            opt_cfg=self.opt_config,
            opt_state=self.opt_state,
        )
        return diag

    def _robust_update(self, updates: list[ClientUpdate]) -> ClientUpdate:
        """The round's updates as ONE update whose change is their per-item-row robust
        aggregate (`fedrec.server.robustness.robust_delta`), for the server step."""
        method = self.config.robust_aggregation
        delta = robust_delta(
            self.params,
            [u.params for u in updates],
            row_tables=("item_table.weight",),
            method="mean" if method == "off" else method,
            trim=self.config.robust_trim,
            row_clip_norm=self.config.row_clip_norm,
        )
        moved = {n: (g + delta[n]).astype(np.float32) for n, g in self.params.items()}
        return ClientUpdate("robust-aggregate", moved, 1)

    def _damp_item_biases(self, before: dict[str, np.ndarray]) -> BiasDamping | None:
        """The round's change of each item's served bias (score units: the bias columns of
        the item table at the serving time, times the bias scale), flagged and damped
        (`bias-anomaly`) and capped (`bias-change-cap`); the correction moves only the bias
        columns. Reads the published aggregate alone: post-processing, under every dp."""
        cap, k = self.config.bias_change_cap, self.config.bias_anomaly
        name = "item_table.weight"
        if not (cap > 0 or k > 0) or name not in self.params:
            return None
        old, new = before[name].astype(np.float64), self.params[name].astype(np.float64)
        w = served_bias_weights(self.model)
        change = (new - old) @ w  # (R,) score units
        damped, flagged, threshold, capped = change, [], 0.0, 0
        if k > 0:
            decay = self.config.server_bias_decay
            damped, flagged, threshold = damp_bias_jumps(
                damped, old @ w, sustained=decay / (1 - decay), k=k
            )
        if cap > 0:
            damped, capped = cap_bias_change(damped, cap)
        corrected = new + np.outer(damped - change, w / (w @ w))
        self.params = {**self.params, name: corrected.astype(np.float32)}
        return BiasDamping(capped=capped, flagged=flagged, threshold=threshold)

    def _refuse_non_finite(self, round: int) -> None:
        """Nothing of a non-finite model is saved or published: the last checkpoint stays."""
        broken = [n for n, v in self.params.items() if not np.isfinite(v).all()]
        if broken:
            raise ModelNotFiniteError(
                f"round {round}: the aggregated model has non-finite values in "
                f"{', '.join(broken)}; the run stops at the checkpoint of round {round - 1}"
            )

    def _metrics_row(
        self,
        round: int,
        collected: RoundReplies,
        discarded: bool,
        diag: AggregationDiagnostics | None,
        seconds: float,
    ) -> dict:
        """The round's row of metrics.jsonl (JSON-safe)."""
        if discarded:
            row = self._discarded_row(round, collected)
        else:
            row = self._round_metrics(round, collected)
        row["seconds"] = seconds
        # simulation-only oracle (the server knows the stream): does the model still rank the
        # early window as well as when it was fresh?
        row["early_window_ndcg@10"] = self.early_window_ndcg()
        row["discarded"] = discarded
        row["server_diagnostics"] = diag.as_metrics() if diag is not None else {}
        row["dropped_kinds"] = dict(collected.dropped_kinds)
        if self.damping is not None:
            row |= self.damping.as_row()
        return _json_safe(row)

    def _discarded_row(self, round: int, collected: RoundReplies) -> dict:
        """What the server of a secure aggregation knows of a round it cannot unmask: whom it
        asked, who answered or failed, and that the round was discarded; none of the sum's
        counters (they are part of the sum)."""
        row = {
            "round": round,
            "sampled": len(collected.devices),
            "aggregated": collected.survivors,
            "failed": collected.failed,
            "dropped": len(collected.dropped),
            "dropped_reasons": collected.dropped[:5],
        }
        if self.user_dp:
            row["user_epsilon"] = self.accountant.epsilon(self.user_delta)
        return row

    def _commit(self, round: int, collected: RoundReplies, discarded: bool, row: dict) -> None:
        """Participation, then the checkpoint (the commit point, with the accountant's
        record), then the published row."""
        line = json.dumps(row) + "\n"
        self.record_participation(round, collected.devices, collected.survivors, discarded)
        save_checkpoint(
            self.out,
            round,
            self.params,
            self.opt_state,
            extra={
                "user_privacy": self.accountant.to_dict(),
                "metrics": row,
                RECORD_KEY: round_record(self.out, self.params, line),
            },
        )
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(line)

    @cached_property
    def ddg_params(self) -> DDGParams:
        """The rounds' discrete mechanism under "secagg" (the devices derive the same one)."""
        return check_ddg_params(self.config, sum(int(v.size) for v in self.params.values()))

    @cached_property
    def participation(self) -> ParticipationLog:
        return ParticipationLog(self.out / PARTICIPATION_FILE, committed=self.next_round - 1)

    def device_name(self, user: int) -> str:
        """The name of a device's store folder (clients/<name>/): its user id."""
        return str(self.stream.dataset.user_ids[user])

    def record_participation(self, round, replies, summed: int, discarded: bool) -> None:
        """The server's record of who was sampled, failed and committed to which ledger head
        (`fedrec.server.run_record`), written before the round's checkpoint commits it."""
        names = {r.user: self.device_name(r.user) for r in replies}
        self.participation.append(
            round,
            registered=len(self.registered),
            devices={names[r.user]: r.ledger_head for r in replies},
            failed=[names[r.user] for r in replies if r.error is not None],
            summed=summed,
            discarded=discarded,
        )

    def _decay_item_biases(self, decay: float) -> None:
        if "item_table.weight" not in self.params:  # frozen (ModelConfig.train_only)
            return
        table = self.params["item_table.weight"].copy()
        columns = self.model.item_columns
        for part in ("bias", "time_bias"):
            table[:, columns[part]] *= 1.0 - decay
        self.params = {**self.params, "item_table.weight": table}

    def _round_metrics(self, round: int, collected: RoundReplies) -> dict:
        """The round's row. Under secure aggregation every count comes from the round's sum
        (`collected.total`): no per-device value exists on the server, so the sampled
        devices' worst interaction ε is a bound read from the sum's histogram, not a maximum."""
        # a reply whose metrics are no numbers was refused for it: nothing of it is counted
        replies = [r for r in collected.devices if check_reply_fields(r) is None]
        total = collected.total
        summed = total.metrics if total is not None else {}

        def count(key: str) -> float:
            return float(sum(r.metrics.get(key, 0.0) for r in replies) + summed.get(key, 0.0))

        eps = [
            r.metrics["max_interaction_epsilon"]
            for r in replies
            if "max_interaction_epsilon" in r.metrics
        ]
        losses = [
            r.metrics["loss"]
            for r in replies
            if r.params is not None and np.isfinite(r.metrics.get("loss", np.nan))
        ]
        loss_sum = sum(losses) + summed.get("loss", 0.0)
        loss_count = len(losses) + summed.get("loss_count", 0.0)
        preq = count("preq_count")
        row = {
            "round": round,
            "sampled": len(replies),
            "aggregated": collected.survivors,
            "declined": collected.declined + int(summed.get("declined", 0)),
            "noise_only": int(count("noise_only")),  # idle devices that sent only their noise
            "failed": collected.failed,
            "dropped": len(collected.dropped),
            "dropped_reasons": collected.dropped[:5],
            "loss": loss_sum / loss_count if loss_count else None,
            "preq_count": preq,
            "preq_hr@10": count("preq_hits@10") / preq if preq else None,
            "preq_ndcg@10": count("preq_ndcg@10") / preq if preq else None,
            "retired_now": count("retired_now"),
            "max_interaction_epsilon_sampled": max(eps) if eps else None,
        }
        if total is not None:  # from the sum's ε histogram: a bound, EPS_BIN coarse
            row["max_interaction_epsilon_sampled_at_most"] = epsilon_bound(summed)
        if self.user_dp:
            row["user_epsilon"] = self.accountant.epsilon(self.user_delta)
        return row

    # -- end of run -----------------------------------------------------------------------------
    def load_into_model(self) -> None:
        load_parameters(self.model, self.params, local={})

    def evaluate(self) -> dict:
        """The protocol's test, comparable with `fedrec train --protocol` (simulation: the
        server knows the held-out interactions; on real devices each one would rank its own)."""
        return self.rank_and_evaluate()[0]

    def rank_and_evaluate(self) -> tuple[dict, Ranks]:
        """`evaluate`'s metrics with the per-row ranks of the evaluated rows."""
        self.load_into_model()
        return rank_and_evaluate_model(self.model, self.stream.split, self.stream.dataset.num_users)


def _json_safe(value):
    """NaN/inf (a device with no non-empty batch has no loss) become null in JSON records."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# The transport of one round: (round, the sampled devices, the global parameters) -> their
# replies, one per device or pooled by a secure sum (`FederatedRun.finish_round` reads both).
SendRound = Callable[[int, list[int], dict[str, np.ndarray]], Sequence[DeviceReply]]


def run_rounds(
    run: FederatedRun,
    send_round: SendRound,
    *,
    before_round: Callable[[int], None] | None = None,
    on_round: Callable[[dict], None] | None = None,
) -> None:
    """Every pending round of `run` over one transport: sample (recorded before any device is
    asked), send, finish (validate, aggregate, account, checkpoint), then `on_round(row)`.

    A resumed run starts after its latest checkpoint (`pending_rounds`), and the run stops
    before a round the user-level budget could not pay for. `before_round(round)` runs first
    in every round: a deployment waits for its devices there (the budget check needs their
    number), a Flower run checks that it still owns the run folder."""
    for round_ in run.pending_rounds():
        if before_round is not None:
            before_round(round_)
        if not run.budget_allows_next_round():
            log.warning("user-level budget reached before round %d: stopping", round_)
            break
        start = time.perf_counter()
        users = [int(u) for u in run.begin_round(round_)]
        replies = send_round(round_, users, run.params)
        row = run.finish_round(round_, replies, time.perf_counter() - start)
        if on_round is not None:
            on_round(row)


__all__ = ["FederatedRun", "RunExistsError", "SendRound", "run_rounds"]

"""Every setting of a federated run, parsed in ONE place from a flat key=value mapping.

The same flat mapping comes from three places, so there is one parser for all of them:
`[tool.flwr.app.config]` defaults (Flower's run_config, kebab-case keys), an experiment TOML
file under `simulations/`, and `fedrec simulate` options. Nothing past `SimulationConfig` reads
string keys.

It lives in `fedrec.common` because every side reads it: the server's run, a device's round
(the settings the run asks of it), the simulation and the command line.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.common.config import DataConfig, parse_key_values
from fedrec.common.model_config import ModelConfig, single_interaction_parameters
from fedrec.common.privacy import CLIPPING
from fedrec.common.privacy.accounting import DiscreteGaussian
from fedrec.common.protocols import PROTOCOLS
from fedrec.common.secagg.encoding import DDGParams
from fedrec.common.secagg.round_params import ddg_round_params, max_devices, per_round_target

DP_PARTS = ("user", "distributed", "local")
# Every DP mode, each with its one spelling: the user-level part first, then the devices'
# calibration (`format_dp`). `parse_dp` reads them; nothing else parses a mode.
DP_MODES = ("off", "user", "distributed", "local", "user+distributed", "user+local")
# Keys of run_config that steer the transport, not the run (set by the launcher): the
# virtual SuperNodes to wait for, and the token of the launch whose lock the ServerApp checks
# before it writes the run folder (fedrec.common.run_lock; empty: the ServerApp locks it).
TRANSPORT_DEFAULTS: dict[str, Any] = {"expected-nodes": 0, "run-token": ""}
TRANSPORT_KEYS = frozenset(TRANSPORT_DEFAULTS)
SECURE_AGGREGATION_PROTOCOLS = ("clear", "secagg")
ATTACKS = ("none", "promote", "random", "scale", "sign-flip", "nan", "inf", "shape", "malformed")
ROBUST_AGGREGATIONS = ("off", "trimmed-mean", "median")


def parse_dp(text: str) -> frozenset[str]:
    """'user+distributed' -> {'user', 'distributed'}; 'off' -> {}. The one parser of a DP mode.

    A mode is a set of parts: the same parts in another order ('distributed+user', what
    config.json recorded before each mode had one spelling) are the same mode, so older run
    folders still resume. Anything else is refused, naming the modes."""
    mode = text.strip().lower()
    if mode == "off":
        return frozenset()
    parts = mode.split("+")
    known = set(parts) <= set(DP_PARTS) and len(set(parts)) == len(parts)
    if known and format_dp(frozenset(parts)) in DP_MODES:
        return frozenset(parts)
    if {"distributed", "local"} <= set(parts):
        raise ValueError("dp: choose distributed OR local calibration of the device noise")
    raise ValueError(f"dp: {text!r} is not a DP mode; use one of {' | '.join(DP_MODES)}")


def format_dp(parts: frozenset[str]) -> str:
    """The one spelling of a DP mode: {'distributed', 'user'} -> 'user+distributed'."""
    rank = {part: i for i, part in enumerate(DP_PARTS)}
    return "+".join(sorted(parts, key=lambda part: rank.get(part, len(rank)))) or "off"


@dataclass(frozen=True)
class SimulationConfig:
    data: DataConfig = field(default_factory=DataConfig)
    rounds: int = 30  # 30 windows of the timeline
    # evaluation protocol whose test is held back from the stream (see common/data/stream.py):
    # "loo" (a), comparable with papers; "temporal" (b), the stream ends at the global cutoff
    protocol: str = "loo"
    # what the final evaluation ranks: "test", or "validation" to choose settings (the
    # validation rows are then held back from the stream instead, and the test is never read)
    evaluate_on: str = "test"
    # expected; Poisson-sampled at rate K/N (capped at 1). A device trains on what it holds
    # only when it is sampled, so the model knows the recent stream through this fraction:
    # more devices per round, better quality and longer rounds. 2700 (q = 0.3 of the built-in
    # devices) keeps the default job within a few minutes on two cores (quality and wall time
    # per count: benchmarks/results/federated_tuning.json, "coverage_sweep").
    clients_per_round: int = 2700
    dp: frozenset[str] = frozenset({"user", "distributed"})
    # per-interaction privacy (device DP-SGD)
    epsilon: float = 8.0  # per-interaction budget (guarantee 2, or 3 when calibrated locally)
    delta: float = 1e-5
    # σ of the sum of >= K_min devices (distributed). 0.7 with q = 1 and one step: ε 7.16 per
    # round, so an interaction trains in one round (as with q = 0.5, 4 steps, σ = 1: ε 7.41),
    # with twice the signal and 1.4x the noise
    aggregate_noise_multiplier: float = 0.7
    local_noise_multiplier: float = 1.0  # σ of one device when calibrated locally
    # K_min: below it a round reveals nothing. 87% of the 2700 expected, the rule the command
    # line derives for any dataset (fedrec.server.run_settings): far enough below the sample
    # that the discard rule's δ is negligible (server.user_privacy.discard_delta), close
    # enough that the sum's noise stays within 1.07σ of its calibration
    min_survivors: int = 2349
    # How the devices of a round reach the server under `distributed`: "clear" simulates
    # secure aggregation (the devices' float updates, with their Gaussian noise, summed where
    # they run; fedrec.server.secure_aggregation.secure_sum); "secagg" runs SecAgg+ over their
    # distributed-discrete-Gaussian encodings (fedrec.common.secagg; in the Flower simulation
    # its execution slots are the parties, fedrec.simulations.secagg_slots; one local step at
    # reference batch 1: see `check_secagg`)
    secure_aggregation_protocol: str = "clear"
    clip_norm: float = 1.0  # per-example clipping norm of DP-SGD
    # user-level privacy (server noise on clipped device updates)
    user_epsilon: float = 8.0
    update_clip_norm: float = 0.5  # only for devices without DP-SGD (see user_sensitivity)
    # local training
    local_steps: int = 1
    sample_rate: float = 1.0
    # B: a device's step sum of clipped gradients is capped at B·C and divided by B, the same
    # public B on every device (one noise unit across devices; see fedrec.client.training)
    reference_batch: int = 1
    local_lr: float = 0.5
    num_negatives: int = 100
    # How devices clip per-example gradients: "fused" (fedrec.common.privacy.dpsgd, one
    # backward and a few batched ops: the cheaper) or "opacus" (Opacus's ExpandedWeights /
    # ghost clipping and DPOptimizer). The same clipped sums; their costs against a plain
    # step: benchmarks/results/dp-clipping-before-after.json.
    per_example_clipping: str = "fused"
    # server
    server_optimizer: str = "fedavg"
    # the plain sum is small (lr·C per device over the expected count): the server steps it
    # up (chosen with the decay below: benchmarks/results/federated_tuning.json,
    # "server_post_processing_2700")
    server_lr: float = 15.0
    # Each published round multiplies the item biases by (1 - decay): an exponentially
    # weighted popularity that follows the stream (the model's memory of old windows fades
    # like recent popularity's). Post-processing of released aggregates: no privacy cost.
    # Too little and stale popularity lingers, too much and each round's noisy sum dominates
    # (the sweep: benchmarks/results/federated_tuning.json, "server_post_processing_2700").
    server_bias_decay: float = 0.5
    # The content model (no per-item id vectors): updates of ~25k numbers instead of ~0.9M,
    # so the same DP noise drowns far less of the signal.
    # One bias knot (fewer noised coordinates) and a 15x bias scale (biases take most of the
    # clipping budget: popularity is the signal that survives the noise).
    model: ModelConfig = field(
        default_factory=lambda: ModelConfig(id_embeddings=False, time_knots=1, bias_scale=15.0)
    )
    # Defences against poisoning devices (fedrec.server.robustness; README, "Malicious
    # devices"). Per-item-row robust aggregation needs the server to see each update, so only
    # without secure aggregation and without user-level noise (whose sensitivity is the
    # clipped sum's): "off" | "trimmed-mean" | "median" over the devices that changed a row.
    robust_aggregation: str = "off"
    robust_trim: float = 0.1  # share cut from each end per coordinate by "trimmed-mean"
    row_clip_norm: float = 0.0  # each device's change of one item row at most this L2 (0: off)
    # Post-processing of the published aggregate, so under every calibration: the largest
    # change of an item's served bias (the popularity term, in score units) one round may
    # make (0: off) ...
    bias_change_cap: float = 0.0
    # ... and a rise beyond what the item's own bias sustains by more than this many robust
    # standard deviations of the round's bias changes is flagged and damped to it (0: off).
    bias_anomaly: float = 0.0
    # Simulated attack (simulation only; `fedrec simulate --scenario`): which devices are
    # malicious is drawn from `seed` (part of the simulation, not DP randomness).
    # "none" | "promote" (targeted) | "random" | "scale" | "sign-flip" | "nan" | "inf" |
    # "shape" | "malformed" (untargeted)
    attack: str = "none"
    malicious_share: float = 0.05  # share of the registered devices that are malicious
    # promoted items: the first a brand-new item (no interaction in the stream: cold start),
    # the others the least interacted with
    attack_targets: int = 2
    # "promote" and "random": the update's norm as a multiple of the bound the server or the
    # secure sum's input check enforces (or of an honest device's lr·C where nothing does)
    attack_boost: float = 1.0
    # data generation, splits, simulation order and the public negatives; never DP noise or
    # sampling, unless `reproducible_noise`
    seed: int = 0
    # Derive DP noise and privacy-relevant sampling from `seed` instead of a CSPRNG under
    # fresh OS keys: identical runs for tests and benchmarks, and NO privacy guarantee
    # (anyone with config.json regenerates the noise); the summary says so
    reproducible_noise: bool = False
    out: Path = Path("runs/simulate")
    resume: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {self.protocol!r}")
        if self.evaluate_on not in ("test", "validation"):
            raise ValueError(f"evaluate-on must be test or validation, not {self.evaluate_on!r}")
        if self.rounds < 1 or self.clients_per_round < 1:
            raise ValueError("rounds and clients-per-round must be >= 1")
        if self.server_optimizer not in ("fedavg", "fedadam"):
            raise ValueError(
                f"server-optimizer must be fedavg or fedadam, not {self.server_optimizer!r}"
            )
        if self.per_example_clipping not in CLIPPING:
            raise ValueError(
                f"per-example-clipping must be one of {sorted(CLIPPING)}, "
                f"not {self.per_example_clipping!r}"
            )
        if not 0 <= self.server_bias_decay < 1:
            raise ValueError("server-bias-decay must be in [0, 1)")
        if self.reference_batch < 1 or self.local_steps < 1 or self.min_survivors < 1:
            raise ValueError("reference-batch, local-steps and min-survivors must be >= 1")
        for f in dataclasses.fields(self):  # nan slips through every comparison below
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name.replace('_', '-')} must be a finite number, not {value}")
        if self.epsilon <= 0 or self.user_epsilon <= 0 or not 0 < self.delta < 1:
            raise ValueError("budgets must be > 0 and delta in (0, 1)")
        if (
            self.model.user_embedding
            and self.dp & {"distributed", "local"}
            and "user" not in self.dp
        ):
            raise ValueError(
                f"model-user-embedding = true with dp = {format_dp(self.dp)}: a LOCAL "
                "user vector voids every per-interaction guarantee, and this dp states no "
                "other. Use dp = user (or user+distributed, user+local), or "
                "model-user-embedding = false"
            )
        if self.secure_aggregation_protocol not in SECURE_AGGREGATION_PROTOCOLS:
            raise ValueError(
                "secure-aggregation-protocol must be one of "
                f"{', '.join(SECURE_AGGREGATION_PROTOCOLS)}, not {self.secure_aggregation_protocol!r}"
            )
        if self.secagg:
            self.check_secagg()
        self.check_robustness()
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), not {self.seed}")
        if self.device_noise_multiplier is not None and not self.model.train_only:
            # Under DP-SGD an example is one interaction scored without context: only the
            # bias tables get a gradient, and noise on the rest would only move it at random
            trained = ",".join(single_interaction_parameters(self.model))
            object.__setattr__(self, "model", dataclasses.replace(self.model, train_only=trained))

    def check_robustness(self) -> None:
        """The attack and defence settings, each refused with what is wrong."""
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, not {self.attack!r}")
        if not 0 <= self.malicious_share < 1:
            raise ValueError(f"malicious-share must be in [0, 1), not {self.malicious_share}")
        if self.attack_targets < 1 or self.attack_boost <= 0:
            raise ValueError("attack-targets must be >= 1 and attack-boost > 0")
        if self.attack != "none" and self.secagg:
            raise ValueError(
                "attack: the simulated attackers send float updates; with secure-aggregation-"
                'protocol = "secagg" the DDG encoding bounds them instead (not simulated)'
            )
        if self.robust_aggregation not in ROBUST_AGGREGATIONS:
            raise ValueError(
                f"robust-aggregation must be one of {', '.join(ROBUST_AGGREGATIONS)}, "
                f"not {self.robust_aggregation!r}"
            )
        if not 0 <= self.robust_trim < 0.5:
            raise ValueError(f"robust-trim must be in [0, 0.5), not {self.robust_trim}")
        if min(self.row_clip_norm, self.bias_change_cap, self.bias_anomaly) < 0:
            raise ValueError(
                "row-clip-norm, bias-change-cap and bias-anomaly must be >= 0 (0: off)"
            )

    @property
    def secagg(self) -> bool:
        """Whether the round's sum is a real SecAgg+ over discrete Gaussian encodings."""
        return self.secure_aggregation_protocol == "secagg"

    def check_secagg(self) -> None:
        """Settings under which the discrete mechanism's guarantee is stated (refused with the
        setting to change otherwise): secure aggregation exists only under `distributed`; the
        device's update must be ONE release of one DP-SGD step at reference batch 1, so that
        an interaction moves it by at most lr·C, the DDG's clip (several steps would each need
        their own discrete noise; B > 1 would clip the whole update to lr·C/B)."""
        if "distributed" not in self.dp:
            raise ValueError(
                'secure-aggregation-protocol = "secagg" needs distributed in --dp (it is the '
                f"sum of the devices' noise), not dp = {'+'.join(sorted(self.dp)) or 'off'}"
            )
        if self.local_steps != 1 or self.reference_batch != 1:
            raise ValueError(
                'secure-aggregation-protocol = "secagg" needs local-steps = 1 and '
                f"reference-batch = 1, not {self.local_steps} and {self.reference_batch}"
            )

    def ddg_params(self, dim: int) -> DDGParams:
        """The rounds' discrete mechanism for updates of `dim` coordinates (under "secagg"):
        one round costs what the continuous calibration's costs
        (`fedrec.common.secagg.round_params`), the update clipped to `user_sensitivity`."""
        target = per_round_target(
            aggregate_noise_multiplier=self.aggregate_noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.local_steps,
            delta=self.delta,
        )
        return ddg_round_params(
            target_epsilon=target,
            delta=self.delta,
            sample_rate=self.sample_rate,
            min_survivors=self.min_survivors,
            max_devices=max_devices(self.clients_per_round),
            dim=dim,
            clip_norm=self.user_sensitivity,
        )

    def discrete_mechanism(self, dim: int) -> DiscreteGaussian:
        """`ddg_params` as the ledger records it."""
        p = self.ddg_params(dim)
        target = per_round_target(
            aggregate_noise_multiplier=self.aggregate_noise_multiplier,
            sample_rate=self.sample_rate,
            steps=self.local_steps,
            delta=self.delta,
        )
        return DiscreteGaussian(
            sigma=p.sigma,
            gamma=p.gamma,
            clip_norm=p.clip_norm,
            bits=p.bits,
            dim=p.dim,
            target_epsilon=target,
        )

    @property
    def stream_protocol(self) -> str:
        """The protocol the stream is built with (`fedrec.common.data.stream.build_stream`)."""
        return self.protocol + (":validation" if self.evaluate_on == "validation" else "")

    def update_norm_bound(self, num_params: int) -> float | None:
        """The largest L2 change an honest device's update can make, which the server (or,
        under secure aggregation, the input check of the sum) enforces on every update.

        With DP-SGD the change is at most lr·C of signal plus the device's own Gaussian noise,
        lr·σ·C/(B·√S) per coordinate over d coordinates, whose norm exceeds std·(√d + t) with
        probability at most exp(-t²/2) (Gaussian concentration); t = 10 makes a false
        rejection of an honest device about 2e-22 likely. Without DP-SGD the device clips its
        update to `update_clip_norm` under user-level DP, and nothing bounds it without DP."""
        sigma = self.device_noise_multiplier
        if sigma is None:
            # float32 rounding of the parameters the change is measured on: a 1e-3 margin
            return self.update_clip_norm * (1 + 1e-3) if "user" in self.dp else None
        noise_std = sigma / (self.reference_batch * math.sqrt(self.local_steps))
        return self.local_lr * self.clip_norm * (1 + noise_std * (math.sqrt(num_params) + 10))

    @property
    def user_sensitivity(self) -> float:
        """L2 bound on one device's update, the sensitivity of user-level DP. With DP-SGD it
        holds by construction: each fixed-point step's clipped sum is projected onto radius
        B·C and divided by B, so the mean of the steps is within lr·C. Without DP-SGD the
        device clips its update to update_clip_norm. The server cannot clip noisy updates without destroying them, and
        under secure aggregation it never sees them: the bound is enforced on the device."""
        if self.device_noise_multiplier is not None:
            return self.local_lr * self.clip_norm
        return self.update_clip_norm

    @property
    def user_noise_from_devices(self) -> float:
        """The noise multiplier, in units of `user_sensitivity`, that the devices' own noise
        already puts in every published sum under user+distributed: each of the n >= K_min
        devices in it adds N(0, (lr·σ/√K_min·C/(B√S))²), so the sum carries at least
        lr·C·σ/(B√S). User-level DP is stated under zero-out adjacency (a user's data replaced
        by none, its device still sampled and sending its noise share; Kairouz et al. 2021),
        where the noise in the sum does not depend on the user, so the server adds only what
        is missing (`FederatedRun.server_noise_multiplier`). 0 when devices add no such noise."""
        if "user" not in self.dp or "distributed" not in self.dp:
            return 0.0
        if self.secagg:
            # discrete noise is no Gaussian to add to the server's: either it pays for user-level
            # DP alone or the server adds all of it (FederatedRun.calibrate_user_noise)
            return 0.0
        return self.aggregate_noise_multiplier / (
            self.reference_batch * math.sqrt(self.local_steps)
        )

    @property
    def noise_seed(self) -> int | None:
        """The seed of DP noise and sampling: None (a CSPRNG under fresh OS keys) unless the
        run opted into reproducible noise (`fedrec.common.privacy.randomness`)."""
        return self.seed if self.reproducible_noise else None

    @property
    def secure_aggregation(self) -> bool:
        """Devices' replies reach the server only as sums (`distributed`: simulated secure
        aggregation, fedrec.server.secure_aggregation.secure_sum)."""
        return "distributed" in self.dp

    @property
    def per_interaction_holds(self) -> bool:
        """Whether a per-interaction guarantee (distributed or local) may be stated: devices
        run DP-SGD and the model has no LOCAL parameters. Every released gradient must depend
        on public values, global parameters and ONE interaction; a local user vector trained
        on the device's other interactions feeds them (even frozen during DP-SGD, it was
        trained on those interactions, and with noise-free gradients), so with local
        parameters only user-level DP, whose unit is the whole device, is stated."""
        return self.device_noise_multiplier is not None and not self.model.user_embedding

    @property
    def distributed_holds(self) -> bool:
        """The per-interaction guarantee with secure aggregation (`per_interaction_holds`)."""
        return "distributed" in self.dp and self.per_interaction_holds

    @property
    def device_noise_multiplier(self) -> float | None:
        """σ each device adds in DP-SGD, or None when devices run plain SGD."""
        if "distributed" in self.dp:
            return self.aggregate_noise_multiplier / math.sqrt(self.min_survivors)
        if "local" in self.dp:
            return self.local_noise_multiplier
        return None

    def to_flat(self) -> dict[str, Any]:
        """The kebab-case mapping Flower's run_config carries (scalars only)."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            if f.name == "data":
                flat |= {"dataset": value.dataset, "data-dir": value.path or ""}
                flat["text-encoder"] = value.text_encoder
                flat["synthetic"] = ",".join(f"{k}={v}" for k, v in value.synthetic.items())
                flat["columns"] = ",".join(f"{k}={v}" for k, v in value.columns.items())
                flat["items-file"] = value.items_path or ""
            elif f.name == "model":
                flat |= {
                    f"model-{k.replace('_', '-')}": v for k, v in dataclasses.asdict(value).items()
                }
            elif f.name == "dp":
                flat["dp"] = format_dp(value)
            elif isinstance(value, Path):
                flat[key] = str(value)
            else:
                flat[key] = value
        return flat

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> SimulationConfig:
        """Parse a kebab-case (or snake_case) flat mapping; unknown keys are errors."""
        values = {str(k).replace("-", "_"): v for k, v in flat.items() if k not in TRANSPORT_KEYS}
        dataset = str(values.pop("dataset", "builtin"))
        encoder = str(values.pop("text_encoder", "") or "")
        data = DataConfig(
            dataset=dataset,
            path=str(values.pop("data_dir", "")) or None,
            columns=parse_key_values(str(values.pop("columns", "")), "columns"),
            items_path=str(values.pop("items_file", "")) or None,
            synthetic=parse_key_values(str(values.pop("synthetic", "")), "synthetic"),
            text_encoder=encoder or ("hashing" if dataset == "synthetic" else "minilm"),
        )
        model_fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
        model_kwargs = {}
        for key in list(values):
            if key.startswith("model_") and key[6:] in model_fields:
                model_kwargs[key[6:]] = values.pop(key)
        defaults = cls()
        # the declared model defaults, not the instance's (whose train-only follows its dp)
        declared_model = {f.name: f for f in dataclasses.fields(cls)}["model"].default_factory()
        model = _coerce_model(declared_model, model_kwargs)
        kwargs: dict[str, Any] = {"data": data, "model": model}
        known = {f.name for f in dataclasses.fields(cls)} - {"data", "model"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown simulation settings: {sorted(unknown)}")
        for key, raw in values.items():
            current = getattr(defaults, key)
            if key == "dp":
                kwargs[key] = parse_dp(str(raw))
            elif isinstance(current, bool):
                kwargs[key] = (
                    raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
                )
            elif isinstance(current, Path):
                kwargs[key] = Path(str(raw))
            else:
                kwargs[key] = type(current)(raw)
        return cls(**kwargs)

    @classmethod
    def from_toml(cls, path: Path, overrides: dict[str, Any] | None = None) -> SimulationConfig:
        return cls.from_flat({**cls.toml_settings(path), **(overrides or {})})

    @staticmethod
    def toml_settings(path: Path) -> dict[str, Any]:
        """The settings an experiment TOML file gives (its [simulation] table, or the file)."""
        with open(path, "rb") as f:
            try:
                table = tomllib.load(f)
            except tomllib.TOMLDecodeError as err:  # its message has the line, not the file
                raise ValueError(f"{path}: not valid TOML: {err}") from err
        return table.get("simulation", table)


def _coerce(current: Any, raw: Any) -> Any:
    """A raw value (TOML, CLI or run_config) as the type of the field's default."""
    if isinstance(current, bool):
        return raw if isinstance(raw, bool) else str(raw).strip().lower() in ("1", "true", "yes")
    if isinstance(current, Path):
        return Path(str(raw))
    return type(current)(raw)


def _coerce_model(defaults: ModelConfig, values: dict[str, Any]) -> ModelConfig:
    return dataclasses.replace(
        defaults, **{k: _coerce(getattr(defaults, k), v) for k, v in values.items()}
    )

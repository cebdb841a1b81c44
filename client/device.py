"""One real device: its config and privacy policy, ingestion, status, recommendations, and its
round in a deployment. Plain functions over the device folder (no Flower); the ClientApp and
the `fedrec client` commands are thin adapters over them.

The device folder (`--store PATH`) holds only what belongs to the device:

    store.sqlite   its interactions (fedrec.client.store)
    local.npz      its local model state
    ledger.jsonl   its privacy ledger (fedrec.client.ledger)
    global.npz     the last global parameters it received, and global.json: the public model
                   spec (the run's settings) needed to rebuild the model from the catalogue

The device is the trust anchor for its own privacy: `policy_violation` compares what a round
asks for with the device's policy and the round is declined, untrained, if it does not fit;
the per-interaction budget is always the device's, never the server's.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.client.store import ClientStore, StoreError
from fedrec.common.config import DataConfig
from fedrec.common.io import atomic_write, atomic_write_json

GLOBAL_FILE = "global.npz"
GLOBAL_SPEC_FILE = "global.json"
LEDGER_FILE = "ledger.jsonl"
SEEN_COHORTS_KEY = "cohorts_seen_by_rounds"
LEDGER_WAIT_S = 30.0  # a round holds the ledger for seconds; ingestion waits for it
MAX_FUTURE_S = 24 * 3600  # clock skew tolerated on an interaction's timestamp


class DeviceConfigError(ValueError):
    """A device config file that cannot be read or holds an invalid value."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """What this device accepts, whatever the server asks (its own config file decides).

    The per-interaction budget is enforced under the LOCAL guarantee (the device's own noise,
    against anyone who sees its update), the one that holds against the server without secure
    aggregation; in a SecAgg+ run under DISTRIBUTED, at the K_min the device itself enforces
    when unmasking (see README, Deployment)."""

    epsilon: float = 8.0  # per-interaction budget
    delta: float = 1e-5
    min_noise_multiplier: float = 0.8  # σ of the device's own DP-SGD noise, at least
    max_clip_norm: float = 1.0  # per-example clipping norm C, at most
    # Per-device metrics (prequential hits, loss, counts) are releases of private data too:
    # sent to the server only when the device allows it.
    allow_evaluation_metrics: bool = False

    def __post_init__(self) -> None:
        numbers = (self.epsilon, self.delta, self.min_noise_multiplier, self.max_clip_norm)
        if not all(math.isfinite(x) for x in numbers):  # TOML has inf and nan: no budget at all
            raise DeviceConfigError(f"policy: every number must be finite, got {numbers}")
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise DeviceConfigError("policy: epsilon must be > 0 and delta in (0, 1)")
        if self.min_noise_multiplier < 0 or self.max_clip_norm <= 0:
            raise DeviceConfigError("policy: min-noise-multiplier >= 0 and max-clip-norm > 0")


@dataclass(frozen=True)
class DeviceConfig:
    store: Path
    # the public catalogue interactions are validated against before any round has run
    data: DataConfig = field(default_factory=DataConfig)
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    # The server's public catalogue file (public-catalogue.npz): with it the device never
    # loads a dataset; without it, it loads the dataset the run names (the built-in one ships
    # with the package).
    catalogue: Path | None = None


def load_device_config(path: Path | None, store: Path | None = None) -> DeviceConfig:
    """Parse a device TOML file ([device] store, dataset; [policy] ...); `store` overrides."""
    table: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise DeviceConfigError(f"{path}: {err}") from err
    device = dict(table.get("device", {}))
    policy_raw = {str(k).replace("-", "_"): v for k, v in table.get("policy", {}).items()}
    known = {f.name for f in dataclasses.fields(PrivacyPolicy)}
    if unknown := set(policy_raw) - known:
        raise DeviceConfigError(f"{path}: unknown [policy] keys {sorted(unknown)}")
    defaults = PrivacyPolicy()
    try:
        policy = PrivacyPolicy(**{k: type(getattr(defaults, k))(v) for k, v in policy_raw.items()})
    except (TypeError, ValueError) as err:
        raise DeviceConfigError(f"{path}: [policy]: {err}") from err
    chosen = store if store is not None else device.get("store")
    if not chosen:
        raise DeviceConfigError("no store: pass --store PATH or set [device] store")
    if path is not None and not Path(chosen).is_absolute() and store is None:
        chosen = Path(path).parent / chosen
    data = DataConfig(dataset=str(device.get("dataset", "builtin")), path=device.get("data-dir"))
    catalogue = device.get("catalogue")
    if catalogue is not None:
        catalogue = Path(str(catalogue))
        if path is not None and not catalogue.is_absolute():
            catalogue = Path(path).parent / catalogue
    return DeviceConfig(store=Path(chosen), data=data, policy=policy, catalogue=catalogue)


# -- ingestion ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class IngestReport:
    added: int
    rejected: tuple[str, ...]  # one message per rejected line: "line N: problem"
    cohort: str | None


def parse_timestamp(raw: Any) -> int:
    """Unix seconds (int, or a float with no fraction) or ISO 8601; ValueError otherwise."""
    if isinstance(raw, bool):
        raise ValueError(f"bad timestamp {raw!r}")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        if not math.isfinite(raw) or raw != int(raw):
            raise ValueError(f"bad timestamp {raw!r}: whole Unix seconds expected")
        return int(raw)
    text = str(raw).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"bad timestamp {text!r}: Unix seconds or ISO 8601 expected") from None
    if when.tzinfo is None:
        raise ValueError(f"bad timestamp {text!r}: ISO 8601 needs a time zone (e.g. Z)")
    return int(when.timestamp())


def parse_line(line: str) -> tuple[str, int] | None:
    """One interaction from a CSV line (item,timestamp) or a JSON object line
    ({"item": ..., "timestamp": ...}); None for a blank line or a CSV header."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"invalid JSON: {err.msg}") from None
        if not isinstance(obj, dict) or "item" not in obj:
            raise ValueError('JSON line without "item"')
        raw_time = obj.get("timestamp", obj.get("time"))
        if raw_time is None:
            raise ValueError('JSON line without "timestamp"')
        return str(obj["item"]).strip(), parse_timestamp(raw_time)
    fields = next(csv.reader(io.StringIO(text)))
    if [f.strip().lower() for f in fields[:2]] in (["item", "timestamp"], ["item", "time"]):
        return None
    if len(fields) != 2:
        raise ValueError(f"expected 2 CSV fields (item,timestamp), got {len(fields)}")
    return fields[0].strip(), parse_timestamp(fields[1])


def validate_lines(
    lines: Iterable[str],
    known_items: set[str],
    stored: set[tuple[str, int]],
    *,
    now: int | None = None,
) -> tuple[list[tuple[str, int]], list[str]]:
    """(accepted (item, timestamp) events, one message per rejected line). Pure."""
    now = int(time.time()) if now is None else now
    accepted, rejected, seen = [], [], set(stored)
    for number, line in enumerate(lines, start=1):
        try:
            parsed = parse_line(line)
        except ValueError as err:
            rejected.append(f"line {number}: {err}")
            continue
        if parsed is None:
            continue
        item, ts = parsed
        if item not in known_items:
            rejected.append(f"line {number}: unknown item {item!r} (not in the catalogue)")
        elif ts < 0 or ts > now + MAX_FUTURE_S:
            rejected.append(f"line {number}: bad timestamp {ts}: before 1970 or in the future")
        elif (item, ts) in seen:
            rejected.append(
                f"line {number}: duplicate of an interaction already stored ({item} at {ts})"
            )
        else:
            seen.add((item, ts))
            accepted.append((item, ts))
    return accepted, rejected


def catalogue_items(data: DataConfig, catalogue: Path | None = None) -> list[str]:
    """The public catalogue's item ids: from the device's catalogue file when it has one."""
    if catalogue is not None:
        from fedrec.client.runtime import read_catalogue_file

        return [str(i) for i in read_catalogue_file(catalogue).catalogue.item_ids]
    return [str(i) for i in data.load().catalogue.item_ids]


def ingest(
    store_dir: Path,
    lines: Iterable[str],
    known_items: set[str],
    *,
    now: int | None = None,
) -> IngestReport:
    """Append the valid lines as one new cohort, in one transaction (all valid lines or none;
    what is stored is never touched). Rejected lines are reported, one message each."""
    from fedrec.client.ledger import PrivacyLedger

    with ClientStore(store_dir, verify=True) as store:
        data = store.interactions()
        stored = set(zip(data.item.tolist(), data.timestamp.tolist(), strict=True))
        accepted, rejected = validate_lines(lines, known_items, stored, now=now)
        if not accepted:
            return IngestReport(0, tuple(rejected), None)
        cohort = f"ingest-{time.time_ns()}"
        # after a running round (it holds the ledger), never in the middle of one
        with _open_ledger(Path(store_dir), PrivacyLedger):
            added = store.ingest([i for i, _ in accepted], [t for _, t in accepted], cohort)
    return IngestReport(added, tuple(rejected), cohort)


def _open_ledger(folder: Path, ledger_cls, wait: float = LEDGER_WAIT_S):
    from fedrec.client.ledger import LedgerBusyError

    deadline = time.monotonic() + wait
    while True:
        try:
            return ledger_cls.open(folder / LEDGER_FILE)
        except LedgerBusyError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# -- status ------------------------------------------------------------------------------------
def status(store_dir: Path, policy: PrivacyPolicy) -> dict[str, Any]:
    """The device's privacy spend from its ledger: per-interaction ε distribution (every
    stored interaction, 0 for those never trained on), retired count, remaining budget."""
    from fedrec.client.ledger import PrivacyLedger
    from fedrec.common.privacy.accounting import TRAIN, Guarantee

    store_dir = Path(store_dir)
    with ClientStore(store_dir, verify=True) as store:
        data = store.interactions()
    with _open_ledger(store_dir, PrivacyLedger) as ledger:
        entries = ledger.entries
        # under SecAgg+ the budget is enforced under DISTRIBUTED (a round without K_min is
        # charged as LOCAL there too, so one view covers a ledger with both kinds)
        secagg = any(
            isinstance(e.get("mechanism"), dict) and e["mechanism"].get("ddg") for e in entries
        )
        guarantee = Guarantee.DISTRIBUTED if secagg else Guarantee.LOCAL
        eps_by_cohort = ledger.epsilons(guarantee, policy.delta)
        retired = ledger.retired_cohorts()
        head = ledger.head_hash
    eps = np.array([eps_by_cohort.get(c, 0.0) for c in data.cohort.tolist()], dtype=np.float64)
    is_retired = np.array([c in retired for c in data.cohort.tolist()], dtype=bool)
    finite = eps[np.isfinite(eps)]
    spent = float(eps.max()) if len(eps) else 0.0
    quantiles = {}
    if len(finite):
        for q in (0.0, 0.5, 0.9, 1.0):
            quantiles[f"p{int(q * 100)}"] = float(np.quantile(finite, q))
    rounds = sorted({e["round"] for e in entries if e["kind"] == TRAIN})
    return {
        "store": str(store_dir),
        "interactions": len(data),
        "guarantee": (
            "distributed (SecAgg+ over at least K_min devices' discrete Gaussian noise, "
            "against an honest-but-curious server)"
            if secagg
            else "local (the device's own noise, against anyone who sees its update)"
        ),
        "delta": policy.delta,
        "budget_epsilon": policy.epsilon,
        "epsilon": quantiles,
        "max_epsilon": spent,
        "remaining_epsilon": max(0.0, policy.epsilon - spent),
        "never_trained": int(np.sum(eps == 0)),
        "retired_interactions": int(is_retired.sum()),
        "retired_cohorts": len(retired),
        "rounds_trained": rounds,
        "ledger_entries": len(entries),
        "ledger_head": head,
    }


# -- the global model on the device --------------------------------------------------------------
def save_global(
    store_dir: Path,
    params: dict[str, np.ndarray],
    spec: dict[str, Any],
    round: int,
    catalogue_digest: str = "",
) -> None:
    """Keep the last global parameters received (and the public spec to rebuild the model)."""
    atomic_write(Path(store_dir) / GLOBAL_FILE, lambda f: np.savez(f, **params))
    atomic_write_json(
        Path(store_dir) / GLOBAL_SPEC_FILE,
        {"round": round, "run_config": spec, "catalogue_digest": catalogue_digest},
    )


def load_global(store_dir: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], int, str]:
    """(parameters, run config, round, catalogue digest) of the last global model kept."""
    folder = Path(store_dir)
    if not (folder / GLOBAL_FILE).exists() or not (folder / GLOBAL_SPEC_FILE).exists():
        raise StoreError(f"{folder}: no global model yet: the device has not taken part in a round")
    try:
        spec = json.loads((folder / GLOBAL_SPEC_FILE).read_text())
        with np.load(folder / GLOBAL_FILE, allow_pickle=False) as data:
            params = {k: data[k] for k in data.files}
    except (OSError, ValueError) as err:
        raise StoreError(f"{folder}: unreadable global model: {err}") from err
    return params, spec["run_config"], int(spec["round"]), spec.get("catalogue_digest", "")


def recommend(
    store_dir: Path, k: int = 10, catalogue: Path | None = None
) -> list[tuple[str, float]]:
    """Top-k items for the device's user from the last global model plus its local state,
    excluding what the user already has. With `catalogue` (the device's public catalogue
    file) the model is rebuilt from it, checked against the digest the run named."""
    from fedrec.client.runtime import device_template
    from fedrec.common.data.history import UserHistories
    from fedrec.common.data.schema import Interactions
    from fedrec.common.model import ModelScorer
    from fedrec.common.run_config import SimulationConfig
    from fedrec.common.run_model import load_parameters

    params, spec, _, digest = load_global(store_dir)
    model, index = device_template(SimulationConfig.from_flat(spec), catalogue, digest)
    with ClientStore(store_dir, verify=True) as store:
        load_parameters(model, params, store.load_local_state())
        data = store.interactions()
    items = np.array([index[i] for i in data.item.tolist() if i in index], dtype=np.int64)
    history = UserHistories.from_interactions(
        Interactions(
            user=np.zeros(len(items), dtype=np.int64),
            item=items,
            timestamp=np.arange(len(items), dtype=np.int64),
        ),
        num_users=1,
    )
    scores = ModelScorer(model, history)(np.zeros(1, dtype=np.int64))[0]
    scores[items] = -np.inf
    top = np.argsort(-scores, kind="stable")[:k]
    ids = list(index)
    return [(ids[i], float(scores[i])) for i in top if np.isfinite(scores[i])]


def connection_settings(path: Path | None) -> dict[str, Any]:
    """The [connection] table of a device file: superlink, root-certificates, key (paths
    relative to the file)."""
    if path is None:
        return {}
    with open(path, "rb") as f:
        table = dict(tomllib.load(f).get("connection", {}))
    for name in ("root-certificates", "key"):
        if name in table and not Path(table[name]).is_absolute():
            table[name] = Path(path).parent / table[name]
    return table

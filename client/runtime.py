"""What a device process keeps between messages, and one simulated device's round.

A worker process serves many rounds (and, in simulation, many virtual devices), so the
catalogue's text features and an Opacus-ready model template are built once per process and
reused; everything that belongs to a device is read from and written to its folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedrec.client.ledger import PrivacyLedger
from fedrec.client.store import ClientStore
from fedrec.client.training import LocalResult, LocalTrainConfig, idle_result, local_round
from fedrec.common.config import DataConfig
from fedrec.common.data.public_catalogue import (
    PublicCatalogue,
    PublicCatalogueError,
    read_public_catalogue,
)
from fedrec.common.model import ModelConfig, RecModel, Scope
from fedrec.common.privacy.accounting import Guarantee
from fedrec.common.text import item_text_features
from fedrec.simulations.config import SimulationConfig
from fedrec.simulations.stream import Stream, load_stream

DELIVERED_KEY = "delivered_through_round"


def local_config(config: SimulationConfig, seed: int | None) -> LocalTrainConfig:
    """The device-side settings a federated run asks for (one place maps one to the other)."""
    if config.distributed_holds:
        guarantee = Guarantee.DISTRIBUTED
    elif "distributed" in config.dp or "local" in config.dp:
        # a local user vector voids the distributed guarantee: budgets hold on the local one
        guarantee = Guarantee.LOCAL
    else:
        guarantee = None
    sigma = config.device_noise_multiplier
    distributed = "distributed" in config.dp
    return LocalTrainConfig(
        steps=config.local_steps,
        sample_rate=config.sample_rate,
        lr=config.local_lr,
        num_negatives=config.num_negatives,
        clip_norm=config.clip_norm,
        noise_multiplier=0.0 if sigma is None else sigma,
        aggregate_noise_multiplier=config.aggregate_noise_multiplier if distributed else None,
        min_survivors=config.min_survivors if distributed else None,
        delta=config.delta,
        budget_epsilon=config.epsilon,
        budget_guarantee=guarantee,
        reference_batch=config.reference_batch,
        clipping=config.per_example_clipping,
        update_clip_norm=config.update_clip_norm if "user" in config.dp else None,
        seed=seed,
        # a device given no seed (a real one) never derives its noise from the run's settings
        reproducible_noise=config.reproducible_noise and seed is not None,
    )


def public_catalogue(data: DataConfig, stream: Stream) -> PublicCatalogue:
    """What the model is built from: the stream's catalogue, its items' text features, and
    the stream's span (the knots span the whole stream: the model is served at the end of
    the window the current round has reached). A deployed device reads the same from a file
    (fedrec.common.data.public_catalogue) instead of loading the dataset."""
    dataset = stream.dataset
    text = item_text_features(dataset.catalogue, data.text_encoder)
    span = (int(stream.rows.timestamp.min()), int(stream.rows.timestamp.max()))
    return PublicCatalogue(dataset.catalogue, text, span)


def model_from(public: PublicCatalogue, model_config: ModelConfig) -> RecModel:
    """A fresh model over a public catalogue; the same initial model in every process."""
    torch.manual_seed(0)
    return RecModel(
        model_config, public.text_features, public.catalogue.years, time_range=public.time_range
    )


def build_model(data: DataConfig, model_config: ModelConfig, stream: Stream) -> RecModel:
    return model_from(public_catalogue(data, stream), model_config)


@lru_cache(maxsize=2)
def _template(key: str) -> tuple[RecModel, dict[str, int]]:
    values = json.loads(key)
    data = DataConfig(**values["data"])
    stream = load_stream(data, values["rounds"], values["protocol"])
    model = build_model(data, ModelConfig(**values["model"]), stream)
    index = {str(item): i for i, item in enumerate(stream.dataset.catalogue.item_ids)}
    return model, index


def _file_key(path: Path) -> tuple[str, int]:
    """(resolved path, modification time): a cache key that an edited file invalidates."""
    resolved = Path(path).resolve()
    try:
        return str(resolved), resolved.stat().st_mtime_ns
    except OSError as err:
        raise PublicCatalogueError(f"{resolved}: unreadable public catalogue: {err}") from err


@lru_cache(maxsize=2)
def _catalogue_file(path: str, mtime_ns: int) -> PublicCatalogue:
    return read_public_catalogue(Path(path))


def read_catalogue_file(path: Path) -> PublicCatalogue:
    """A device's public catalogue file, read once per process while it is unchanged."""
    return _catalogue_file(*_file_key(path))


@lru_cache(maxsize=2)
def _template_from_file(path: str, mtime_ns: int, model_key: str):
    public = _catalogue_file(path, mtime_ns)
    return model_from(public, ModelConfig(**json.loads(model_key))), public.item_index()


def template_from_catalogue(
    path: Path, config: SimulationConfig, digest: str
) -> tuple[RecModel, dict[str, int]]:
    """The model template of a run from a device's public catalogue file, checked against the
    digest the run names (the server's copy): a different catalogue would train a different
    model, so it is an error, never a guess."""
    key = _file_key(path)
    public = _catalogue_file(*key)
    if public.digest != digest:
        raise PublicCatalogueError(
            f"{path}: this public catalogue (digest {public.digest[:12]}) is not the run's "
            f"({digest[:12] or 'none named'}): copy the server's public-catalogue.npz"
        )
    model_key = json.dumps(dataclasses.asdict(config.model), sort_keys=True)
    return _template_from_file(*key, model_key)


def device_template(
    config: SimulationConfig, catalogue: Path | None, digest: str
) -> tuple[RecModel, dict[str, int]]:
    """A real device's model template: from its public catalogue file when it has one (checked
    against the run's `digest`), else from the dataset the run names."""
    if catalogue is not None:
        return template_from_catalogue(catalogue, config, digest)
    return template_for(config)


_LAST_TEMPLATE: list = []  # [(config, template)]: devices of one message share a config


def template_for(config: SimulationConfig) -> tuple[RecModel, dict[str, int]]:
    if _LAST_TEMPLATE and _LAST_TEMPLATE[0][0] is config:
        return _LAST_TEMPLATE[0][1]
    key = json.dumps(
        {
            "data": dataclasses.asdict(config.data),
            "model": dataclasses.asdict(config.model),
            "rounds": config.rounds,
            "protocol": config.stream_protocol,
        },
        sort_keys=True,
    )
    template = _template(key)
    _LAST_TEMPLATE[:] = [(config, template)]
    return template


def client_dir(config: SimulationConfig, user_id: str) -> Path:
    return Path(config.out) / "clients" / user_id


def simulated_device_round(
    config: SimulationConfig, user: int, round: int, global_params: dict[str, np.ndarray]
) -> LocalResult:
    """Round `round` (1-based) for the virtual device of dense user `user`: deliver the windows
    that arrived since its last round into its store, then run `local_round`."""
    model, index = template_for(config)
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    user_id = str(stream.dataset.user_ids[user])
    folder = client_dir(config, user_id)
    device = local_config(config, _seed(config, user))
    if not folder.exists() and not stream.deliveries(user, 0, round):
        # Nothing has arrived on this device yet: the reply an empty store would give, without
        # creating one (most devices sampled early in a run are still empty).
        reason = "no trainable example: nothing has arrived on this device yet"
        return idle_result(global_params, device, round, reason)
    idle = _still_idle(folder, stream, user, round)
    if idle is not None:
        reason = "no trainable example: nothing new since the last round it had nothing to train"
        return idle_result(global_params, device, round, reason, idle)
    result = _device_round(device, model, index, stream, user, folder, round, global_params)
    if result.idle_metrics is not None:
        _remember_idle(folder, round, result.idle_metrics)
    return result


# A simulated device that had nothing to train stays so until something new arrives: it
# only needs its noise (or a decline) again, not its store and ledger opened (measured: most of
# a 1000-device round). The marker is a cache, checked against the stream: it is trusted only
# while nothing was delivered since, so a stale or lost one can never skip real work.
IDLE_FILE = "idle.json"


def _still_idle(folder: Path, stream: Stream, user: int, round: int) -> dict | None:
    try:
        marker = json.loads((folder / IDLE_FILE).read_text())
        since, metrics = int(marker["round"]), dict(marker["metrics"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if since >= round or stream.deliveries(user, since, round):
        return None
    return metrics


def _remember_idle(folder: Path, round: int, metrics: dict) -> None:
    tmp = folder / (IDLE_FILE + ".tmp")
    tmp.write_text(json.dumps({"round": round, "metrics": metrics}))
    tmp.replace(folder / IDLE_FILE)


def _device_round(device, model, index, stream, user, folder, round, global_params):
    # the simulation's stores are rebuilt from the stream (re-delivery is idempotent): no
    # fsync there; the ledger keeps its own
    with (
        ClientStore(folder, durable=False) as store,
        PrivacyLedger.open(folder / "ledger.jsonl") as ledger,
    ):
        delivered = int(store.get_meta(DELIVERED_KEY, "0"))
        new_cohorts = set()
        for delivery in stream.deliveries(user, delivered, round):
            store.ingest(delivery.items, delivery.timestamps, delivery.cohort)
            new_cohorts.add(delivery.cohort)
        store.set_meta(DELIVERED_KEY, str(max(delivered, round)))
        return local_round(
            model,
            global_params,
            store,
            ledger,
            index,
            round=round,
            new_cohorts=frozenset(new_cohorts),
            config=device,
            now=int(stream.window_end[round - 1]),
        )


def _seed(config: SimulationConfig, user: int) -> int | None:
    return None if config.seed is None else config.seed * 100_003 + user


def global_parameters(model: RecModel) -> dict[str, np.ndarray]:
    state = model.state_dict()
    return {name: state[name].numpy().copy() for name in model.parameter_names(Scope.GLOBAL)}


# The simulated devices' key for ledger commitments (in clients/, their storage, which the
# server never reads; an auditor given the devices' folders reads it)
COMMIT_KEY_FILE = "commit.key"
COMMIT_CHARS = 16  # 64 bits: matching a forged ledger to a recorded commitment is infeasible


_COMMIT_KEYS: dict[tuple[Path, int, int], bytes] = {}


def _commit_key(folder: Path) -> bytes:
    """The key in `folder`, created by the first worker that needs it; read once per process
    while the file stays the same one (a run folder made anew at the same path gets its own)."""
    path = folder / COMMIT_KEY_FILE
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{COMMIT_KEY_FILE}.{os.getpid()}"
        tmp.write_bytes(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # atomic: concurrent workers all end up with the first key
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        stat = os.stat(path)
    cache_key = (path, stat.st_ino, stat.st_mtime_ns)
    if cache_key not in _COMMIT_KEYS:
        if len(_COMMIT_KEYS) > 16:
            _COMMIT_KEYS.clear()
        _COMMIT_KEYS[cache_key] = path.read_bytes()
    return _COMMIT_KEYS[cache_key]


def ledger_commitment(key: bytes, device: str, round: int, head: str) -> str:
    """HMAC-SHA256(key, "device\0round\0head"), truncated: a value that looks random to
    anyone without the key (the server learns nothing of the ledger, not even whether it
    changed), and that an auditor with the key checks against the ledger's head after the
    round."""
    message = f"{device}\0{round}\0{head}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:COMMIT_CHARS]


def device_commitment(config: SimulationConfig, user: int, round: int) -> str:
    """What a simulated device reports with every reply: its commitment to its ledger's head
    after the round (the genesis hash while it has no entries)."""
    stream = load_stream(config.data, config.rounds, config.protocol)
    name = str(stream.dataset.user_ids[user])
    head = _last_hash(client_dir(config, name) / "ledger.jsonl") or "0" * 64
    return ledger_commitment(_commit_key(Path(config.out) / "clients"), name, round, head)


def _last_hash(path: Path) -> str | None:
    """The hash of a ledger's last entry, read from its last line (the ledger verified the
    chain when it appended it); None without entries."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - 65536))
            tail = f.read()
            if size > len(tail) and tail.count(b"\n") < 2:
                f.seek(0)
                tail = f.read()
    except FileNotFoundError:
        return None
    lines = tail.rstrip(b"\n").split(b"\n")
    return json.loads(lines[-1])["hash"] if lines and lines[-1] else None

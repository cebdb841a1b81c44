"""What a device process keeps between messages, and one simulated device's round.

A worker process serves many rounds (and, in simulation, many virtual devices), so the
catalogue's text features and an Opacus-ready model template are built once per process and
reused; everything that belongs to a device is read from and written to its folder.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedrec.client.ledger import PrivacyLedger
from fedrec.client.store import ClientStore
from fedrec.client.training import LocalResult, LocalTrainConfig, local_round
from fedrec.common.config import DataConfig
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
        update_clip_norm=config.update_clip_norm if "user" in config.dp else None,
        seed=seed,
    )


def build_model(data: DataConfig, model_config: ModelConfig, stream: Stream) -> RecModel:
    """A fresh model over the stream's catalogue. Knots span the whole stream: the model is
    served at the end of the window the current round has reached."""
    dataset = stream.dataset
    text = item_text_features(dataset.catalogue, data.text_encoder)
    span = (int(stream.rows.timestamp.min()), int(stream.rows.timestamp.max()))
    torch.manual_seed(0)  # the initial global model is the same in every process
    return RecModel(model_config, text, dataset.catalogue.years, time_range=span)


@lru_cache(maxsize=2)
def _template(key: str) -> tuple[RecModel, dict[str, int]]:
    values = json.loads(key)
    data = DataConfig(**values["data"])
    stream = load_stream(data, values["rounds"])
    model = build_model(data, ModelConfig(**values["model"]), stream)
    index = {str(item): i for i, item in enumerate(stream.dataset.catalogue.item_ids)}
    return model, index


def template_for(config: SimulationConfig) -> tuple[RecModel, dict[str, int]]:
    key = json.dumps(
        {
            "data": dataclasses.asdict(config.data),
            "model": dataclasses.asdict(config.model),
            "rounds": config.rounds,
        },
        sort_keys=True,
    )
    return _template(key)


def client_dir(config: SimulationConfig, user_id: str) -> Path:
    return Path(config.out) / "clients" / user_id


def simulated_device_round(
    config: SimulationConfig, user: int, round: int, global_params: dict[str, np.ndarray]
) -> LocalResult:
    """Round `round` (1-based) for the virtual device of dense user `user`: deliver the windows
    that arrived since its last round into its store, then run `local_round`."""
    model, index = template_for(config)
    stream = load_stream(config.data, config.rounds)
    user_id = str(stream.dataset.user_ids[user])
    folder = client_dir(config, user_id)
    with ClientStore(folder) as store, PrivacyLedger.open(folder / "ledger.jsonl") as ledger:
        delivered = int(store.get_meta(DELIVERED_KEY, "0"))
        new_cohorts = set()
        for delivery in stream.deliveries(user, delivered, round):
            store.ingest(
                delivery.items, delivery.timestamps, delivery.cohort, ledger.retired_cohorts()
            )
            new_cohorts.add(delivery.cohort)
        store.set_meta(DELIVERED_KEY, str(max(delivered, round)))
        seed = None if config.seed is None else config.seed * 100_003 + user
        return local_round(
            model,
            global_params,
            store,
            ledger,
            index,
            round=round,
            new_cohorts=frozenset(new_cohorts),
            config=local_config(config, seed),
            now=int(stream.window_end[round - 1]),
        )


def global_parameters(model: RecModel) -> dict[str, np.ndarray]:
    state = model.state_dict()
    return {name: state[name].numpy().copy() for name in model.parameter_names(Scope.GLOBAL)}

"""The settings a run asks of a device (`local_config`), and what a device process keeps
between messages: the model template of a run.

A worker process serves many rounds (and, in simulation, many virtual devices), so the
catalogue's text features and an Opacus-ready model template are built once per process and
reused; everything that belongs to a device is read from and written to its folder.
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from fedrec.client.training import LocalTrainConfig
from fedrec.common.config import DataConfig
from fedrec.common.data.public_catalogue import (
    PublicCatalogue,
    PublicCatalogueError,
    read_public_catalogue,
)
from fedrec.common.data.stream import load_stream
from fedrec.common.model import ModelConfig, RecModel, Scope
from fedrec.common.privacy.accounting import Guarantee
from fedrec.common.run_config import SimulationConfig
from fedrec.common.run_model import build_model, model_from


def local_config(
    config: SimulationConfig, seed: int | None, dim: int | None = None
) -> LocalTrainConfig:
    """The device-side settings a federated run asks for (one place maps one to the other);
    `dim`: the update's coordinates, when the caller has the model (else the run's template)."""
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
        discrete=(
            config.discrete_mechanism(update_dim(config) if dim is None else dim)
            if config.secagg
            else None
        ),
    )


def update_dim(config: SimulationConfig) -> int:
    """Coordinates of a device's update: the model's global parameters, flattened."""
    return model_update_dim(template_for(config)[0])


def model_update_dim(model: RecModel) -> int:
    """Coordinates of `model`'s global parameters, flattened."""
    state = model.state_dict()
    return sum(state[name].numel() for name in model.parameter_names(Scope.GLOBAL))


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

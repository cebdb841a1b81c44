"""The model of a federated run: built the same in every process from the run's public
catalogue, its global parameters read out and loaded back.

The server builds it to aggregate into and to evaluate, a device to train (from its catalogue
file, or from the dataset the run names), the simulation for its virtual devices: one builder
for all of them, so every side starts from the same initial model.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrec.common.config import DataConfig
from fedrec.common.data.public_catalogue import PublicCatalogue
from fedrec.common.data.stream import Stream
from fedrec.common.model import ModelConfig, RecModel, Scope
from fedrec.common.text import item_text_features

Params = dict[str, np.ndarray]


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


def global_parameters(model: RecModel) -> Params:
    state = model.state_dict()
    return {name: state[name].numpy().copy() for name in model.parameter_names(Scope.GLOBAL)}


def load_parameters(model: RecModel, global_params: Params, local: Params) -> None:
    """Validated global parameters (shape, finite) and the device's local ones into `model`."""
    names = model.parameter_names(Scope.GLOBAL)
    missing = set(names) - set(global_params)
    if missing:
        raise ValueError(f"global parameters missing: {sorted(missing)}")
    state = model.state_dict()
    for name in names:
        value = global_params[name]
        if value.shape != tuple(state[name].shape):
            raise ValueError(
                f"global parameter {name}: shape {value.shape}, expected {tuple(state[name].shape)}"
            )
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"global parameter {name}: {int(np.sum(~np.isfinite(value)))} non-finite values"
            )
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    for name in model.parameter_names(Scope.LOCAL):
        if name in local:
            state[name] = torch.from_numpy(local[name])
        else:
            torch.nn.init.zeros_(state[name])
    model.load_state_dict(state)

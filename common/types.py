"""Named aliases that say what a value means, not just what it is."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeAlias

import numpy as np
import torch

UserIndex: TypeAlias = int  # dense 0..num_users-1, internal only
ItemIndex: TypeAlias = int  # dense 0..num_items-1, internal only
ExternalId: TypeAlias = str  # the id as written in the source file
Timestamp: TypeAlias = int  # Unix seconds, UTC
StateDict: TypeAlias = "OrderedDict[str, torch.Tensor]"
Metrics: TypeAlias = dict[str, float]
IndexArray: TypeAlias = np.ndarray  # int64 array of dense indices

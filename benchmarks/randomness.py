"""Speed of the privacy randomness (a CSPRNG) against the generators it replaced, in one process.

    python benchmarks/randomness.py [--out benchmarks/results/randomness.json]

Normals per second for one device round's noise (the default job's 25,271 global parameters):
torch.randn (the devices' old MT19937 draw), numpy's Generator.normal (the server's old PCG64
draw) and `PrivacyRandomness` (AES-256-CTR + Box-Muller), alternated so that drift on a shared
machine shows as disagreement between repeats; and the default job's draw count.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedrec.common.privacy.randomness import PrivacyRandomness


def rate(draw, size: int, reps: int = 200, blocks: int = 7) -> float:
    """Median over blocks of values drawn per CPU second of this process (process time, not
    wall time: other work on a shared machine takes turns, it does not bill this process)."""
    draw()
    out = []
    for _ in range(blocks):
        start = time.process_time()
        for _ in range(reps):
            draw()
        out.append(reps * size / (time.process_time() - start))
    return float(np.median(out))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as on a device worker
    from fedrec.client.runtime import template_for
    from fedrec.common.run_config import SimulationConfig
    from fedrec.common.run_model import global_parameters

    config = SimulationConfig()
    params = global_parameters(template_for(config)[0])
    size = sum(v.size for v in params.values())
    like = list(params.values())
    g, rng, source = (
        torch.Generator().manual_seed(0),
        np.random.default_rng(0),
        PrivacyRandomness.secure(),
    )
    draws = {
        "old_device_torch_randn": lambda: torch.randn(size, generator=g),
        "new_device_normal_like_float32": lambda: source.normal_like(like, 1.0),
        "old_server_numpy_normal": lambda: rng.normal(0.0, 1.0, size),
        "new_server_normal_float64": lambda: source.normal(0.0, 1.0, size),
        "new_bernoulli_mask": lambda: source.bernoulli(size, 0.3),
    }
    rates: dict[str, list[float]] = {k: [] for k in draws}
    for _ in range(args.repeats):
        for name, draw in draws.items():
            rates[name].append(rate(draw, size) / 1e6)
    expected_devices = config.clients_per_round * config.rounds
    device_normals = expected_devices * size
    old, new = (
        np.median(rates[k]) for k in ("old_device_torch_randn", "new_device_normal_like_float32")
    )
    result = {
        "what": "values drawn per CPU second (millions), one thread, alternated repeats",
        "load_average": os.getloadavg()[0],
        "parameters_noised_per_device_round": size,
        "rates_M_per_s": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "default_job": {
            "device_rounds_expected": expected_devices,  # every sampled device adds noise
            "device_normals": device_normals,
            "server_normals": config.rounds * size,
            "device_noise_cpu_s_old": device_normals / (old * 1e6),
            "device_noise_cpu_s_new": device_normals / (new * 1e6),
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

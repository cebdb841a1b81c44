"""DP ÷ plain device rounds of the default job, one line of JSON per call.

    python benchmarks/dp_clipping_ratios.py fused after
    python benchmarks/dp_clipping_ratios.py opacus after

The batch sizes are the job's own (the last speed run's `training_rounds_by_pairs` in
benchmarks/results/federated.json). Before/after comparisons interleave calls on the two
trees in one sitting (`git stash` between them; the script also runs on trees whose
benchmark has no `clipping` parameter), as recorded in dp-clipping-before-after.json.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from federated import dp_step_ratio, job_mix, single_step_ratio


def main() -> None:
    clipping, tree = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    results = Path(__file__).resolve().parent / "results" / "federated.json"
    sizes = json.loads(results.read_text())["speed"]["training_rounds_by_pairs"]
    mix = job_mix({int(k): v for k, v in sizes.items()})
    takes_clipping = "clipping" in inspect.signature(dp_step_ratio).parameters
    kw = {"clipping": clipping} if takes_clipping else {}
    out: dict = {"tree": tree, **kw}
    batches = {"job_mix": mix, "one_pair": (1,), "two_pairs": (2,), "six_pairs": (6,)}
    for name, pairs in (batches | {"16_pairs": (16,)}).items():
        out[name] = round(dp_step_ratio(pairs=pairs, **kw), 3)
    out["single_step_six_pairs"] = round(single_step_ratio(**kw), 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

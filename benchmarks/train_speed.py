"""Wall time and validation quality of `fedrec train` before and after a change, back to back.

The code of `--before` (a git revision) is exported to a temporary folder and run through the
same interpreter and data as the working tree's, alternately, so that both face the same load:

    python benchmarks/train_speed.py --before 43ea35d --repeats 1 \
        --args "--dataset synthetic --synthetic num_users=1000,num_items=3000,mean_interactions_per_user=110"

Writes OUT/train-speed.json: per run the command line, wall seconds, the training seconds per
protocol, the best validation NDCG@10 (early stopping's choice; the test is only reported).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "server", "client", "cli", "simulations")


def export_revision(revision: str, folder: Path) -> Path:
    """`git archive` of `revision` laid out as an importable `fedrec` package; the PYTHONPATH."""
    archive = folder / "src.tar"
    subprocess.run(["git", "archive", "-o", str(archive), revision], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    package = folder / "pkg" / "fedrec"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in PACKAGES:
        (package / name).symlink_to(folder / "src" / name)
    return folder / "pkg"


def run(label: str, pythonpath: str | None, args: list[str], out: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    command = [sys.executable, "-m", "fedrec.cli", "train", *args, "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "epochs.jsonl").read_text().splitlines()]
    protocols = {}
    for name, result in summary["protocols"].items():
        valid = [r["valid_ndcg@10"] for r in rows if r["protocol"] == name]
        protocols[name] = {
            "train_seconds": result["train_seconds"],
            "epochs_run": result["epochs_run"],
            "best_epoch": result["best_epoch"],
            "best_valid_ndcg@10": max(valid) if valid else None,
            "test_ndcg@10": result["test"]["ndcg@10"],
            "test_coverage@10": result["test"]["coverage@10"],
        }
    print(f"{label}: {wall:.1f} s  {protocols}", flush=True)
    return {
        "code": label,
        "command": "fedrec train " + shlex.join(args),
        "wall_seconds": wall,
        "protocols": protocols,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="git revision of the code before")
    parser.add_argument("--args", default="", help="fedrec train arguments, both runs")
    parser.add_argument("--after-args", default="", help="extra arguments of the after run")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    base = shlex.split(args.args)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        before = export_revision(args.before, Path(tmp))
        for repeat in range(args.repeats):
            runs.append(run(f"before ({args.before})", str(before), base, Path(tmp) / f"b{repeat}"))
            after = base + shlex.split(args.after_args)
            runs.append(run("after (working tree)", None, after, Path(tmp) / f"a{repeat}"))
    walls = {r["code"]: r["wall_seconds"] for r in runs}
    result = {
        "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "runs": runs,
        "speedup_wall": min(v for k, v in walls.items() if k.startswith("before"))
        / min(v for k, v in walls.items() if k.startswith("after")),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train-speed.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"speed-up (wall): {result['speedup_wall']:.2f}x")


if __name__ == "__main__":
    main()

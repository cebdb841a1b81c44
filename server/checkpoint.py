"""Atomic per-round checkpoints of the server state: parameters, optimizer state, metadata.

Layout under `run_dir/checkpoints/`:
    round-0007.npz   arrays `params/<name>`, `opt_m/<name>`, `opt_v/<name>` and `__meta__`
                     (UTF-8 JSON bytes: format, round, optimizer steps, names, `extra`)
    latest.json      {"round": 7, "file": "round-0007.npz"}: the commit point

A round file is written to a temporary name, fsynced and renamed (`os.replace`), then
latest.json is replaced the same way. A crash leaves either the previous state or the new one,
plus at most a stray temp file (ignored, and removed by the next save) or a round file newer than
latest.json (an uncommitted round: ignored, overwritten when that round is saved again).
The caller publishes a round's model only after `save_checkpoint` returns, so everything it
published, and the privacy spend in `extra`, is in the checkpoint latest.json names.
Corruption is caught by the zip CRC of every member and by checking the metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedrec.common.io import TMP_PREFIX as _TMP_PREFIX
from fedrec.common.io import atomic_write, atomic_write_json
from fedrec.server.aggregation import Params, ServerOptState

log = logging.getLogger(__name__)

FORMAT = 1
LATEST = "latest.json"
_ROUND_FILE = re.compile(r"^round-(\d+)\.npz$")
_META = "__meta__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not hold what it should. Names the file."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    round: int
    params: Params
    opt_state: ServerOptState
    extra: dict[str, Any]
    path: Path
    # Files passed over to reach this one (fallback=True), each with the reason: the caller must
    # reconcile anything kept only in their `extra` (e.g. privacy spend, see user_privacy).
    skipped: tuple[str, ...] = field(default=())


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def round_file_name(round: int) -> str:
    return f"round-{round:04d}.npz"


def _round_files(folder: Path) -> dict[int, Path]:
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = _ROUND_FILE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def _read_latest(folder: Path) -> int | None:
    """The committed round, None without latest.json; CheckpointError if it is unreadable."""
    path = folder / LATEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    rnd = data.get("round") if isinstance(data, dict) else None
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        raise CheckpointError(f"{path}: no valid 'round' in {data!r}")
    if data.get("file") != round_file_name(rnd):
        raise CheckpointError(f"{path}: 'file' does not match round {rnd}: {data!r}")
    return rnd


def _readable(folder: Path, round: int) -> bool:
    try:
        load_checkpoint(folder / round_file_name(round))
    except CheckpointError:
        return False
    return True


def save_checkpoint(
    run_dir: str | Path,
    round: int,
    params: Mapping[str, np.ndarray],
    opt_state: ServerOptState,
    extra: Mapping[str, Any] | None = None,
    *,
    keep_last: int | None = None,
) -> Path:
    """Write round `round`'s state atomically and commit it in latest.json. Returns the file.

    `extra` must be JSON-serialisable (e.g. `UserLevelAccountant.to_dict()`). `round` may not be
    below the committed one while that one is readable: restarting from scratch into a used
    run_dir would silently lose the privacy spend recorded there (use `load_latest`, or a new
    run_dir); after `load_latest(fallback=True)` the run continues from the restored round and
    overwrites the broken ones. `keep_last=K` deletes committed round files older than the K
    most recent; None keeps all.
    """
    if not isinstance(round, int) or isinstance(round, bool) or round < 0:
        raise ValueError("round must be an integer >= 0")
    if keep_last is not None and keep_last < 1:
        raise ValueError("keep_last must be None or >= 1")
    folder = checkpoint_dir(run_dir)
    try:
        committed = _read_latest(folder)
    except CheckpointError as exc:  # after load_latest(fallback=True): this save repairs it
        log.warning("overwriting %s", exc)
        committed = None
    if committed is not None and round < committed and _readable(folder, committed):
        raise ValueError(
            f"round {round} is older than the committed checkpoint round {committed} in "
            f"{folder}: resume with load_latest or use a new run_dir"
        )
    arrays: dict[str, np.ndarray] = {}
    for prefix, group in (("params", params), ("opt_m", opt_state.m), ("opt_v", opt_state.v)):
        for name, value in group.items():
            if not isinstance(value, np.ndarray) or value.dtype != np.float32:
                raise ValueError(f"{prefix} {name!r} must be a float32 numpy array")
            arrays[f"{prefix}/{name}"] = value
    meta = {
        "format": FORMAT,
        "round": round,
        "opt_steps": opt_state.steps,
        "param_names": list(params),
        "opt_names": list(opt_state.m),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(meta, allow_nan=False, separators=(",", ":"))
        arrays[_META] = np.frombuffer(text.encode(), dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint extra must be JSON-serialisable: {exc}") from exc

    for stale in folder.glob(f"{_TMP_PREFIX}*") if folder.is_dir() else ():
        with contextlib.suppress(OSError):
            stale.unlink()  # left by a crash mid-write; one server writes a run_dir
    path = folder / round_file_name(round)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    atomic_write_json(folder / LATEST, {"round": round, "file": path.name})
    if keep_last is not None:
        older = sorted(r for r in _round_files(folder) if r <= round)[:-keep_last]
        for r in older:
            (folder / round_file_name(r)).unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and check one round file; CheckpointError naming it if corrupted or truncated."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = {key: z[key] for key in z.files}  # reads every member: checks every CRC
        meta = json.loads(stored.pop(_META).tobytes().decode())
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        params = {n: stored.pop(f"params/{n}") for n in meta["param_names"]}
        m = {n: stored.pop(f"opt_m/{n}") for n in meta["opt_names"]}
        v = {n: stored.pop(f"opt_v/{n}") for n in meta["opt_names"]}
        if stored:
            raise ValueError(f"unexpected arrays {sorted(stored)}")
        rnd, steps, extra = meta["round"], meta["opt_steps"], meta["extra"]
        if not (isinstance(extra, dict) and isinstance(steps, int) and isinstance(rnd, int)):
            raise ValueError("bad metadata")
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except (
        OSError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        zipfile.BadZipFile,
    ) as exc:
        raise CheckpointError(f"{path}: corrupted or truncated checkpoint ({exc})") from exc
    m_name = _ROUND_FILE.match(path.name)
    if m_name and int(m_name.group(1)) != rnd:
        raise CheckpointError(f"{path}: holds round {rnd}, not the round in its name")
    state = ServerOptState(steps=steps, m=m, v=v)
    return Checkpoint(round=rnd, params=params, opt_state=state, extra=extra, path=path)


def load_latest(run_dir: str | Path, *, fallback: bool = False) -> Checkpoint | None:
    """The committed checkpoint of `run_dir`, or None if there is none.

    latest.json names it; without latest.json (deleted, or a crash before the first commit) the
    highest-numbered round file is taken. A corrupted checkpoint raises CheckpointError naming
    it, unless `fallback=True`: then the next older round files are tried, newest first, and
    the result lists what was skipped. A fallback rolls back everything in `extra`: if the
    skipped rounds' models were published, their privacy spend is NOT in the result's `extra`
    (keep the user-level accountant in its own file too, see `user_privacy.save_accountant`).
    """
    folder = checkpoint_dir(run_dir)
    files = _round_files(folder)
    problems: list[str] = []
    try:
        committed = _read_latest(folder)
    except CheckpointError as exc:
        if not fallback:
            raise
        problems.append(str(exc))
        committed = max(files, default=None)
    if committed is None:
        committed = max(files, default=None)
        if committed is None:
            return None
    candidates = [committed, *sorted((r for r in files if r < committed), reverse=True)]
    for rnd in candidates:
        try:
            ckpt = load_checkpoint(folder / round_file_name(rnd))
        except CheckpointError as exc:
            if not fallback:
                raise
            problems.append(str(exc))
            log.warning("skipping checkpoint: %s", exc)
            continue
        return replace(ckpt, skipped=tuple(problems))
    raise CheckpointError(f"{folder}: no readable checkpoint: " + "; ".join(problems))

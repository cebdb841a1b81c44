"""The simulated devices: one per user of the stream, its folder under the run's clients/.

A simulated device's round delivers the windows of the stream that arrived since its last round
into its store, then runs the real device's `local_round` (`fedrec.client.training`); its reply
carries a keyed commitment to its ledger's head. `run_in_process` is the transport that calls
them one after another in this process (tests, baselines); the Flower simulation runs the same
`device_reply` in its execution slots (`fedrec.simulations.client_app`). Delivering the
stream's windows is simulation only: a real device's interactions arrive through `fedrec client
ingest`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedrec.client.ledger import PrivacyLedger
from fedrec.client.runtime import local_config, template_for
from fedrec.client.store import ClientStore
from fedrec.client.training import LocalResult, idle_result, local_round
from fedrec.common.data.stream import Stream, load_stream
from fedrec.common.privacy.randomness import privacy_randomness
from fedrec.common.replies import DeviceReply
from fedrec.common.run_config import SimulationConfig
from fedrec.server.federated_run import FederatedRun, run_rounds
from fedrec.server.secure_aggregation import secure_sum
from fedrec.simulations.attacks import malicious_devices, malicious_reply
from fedrec.simulations.secagg_devices import secagg_round

# the store's record of the windows delivered to it so far (re-delivery is idempotent)
DELIVERED_KEY = "delivered_through_round"


def client_dir(config: SimulationConfig, user_id: str) -> Path:
    return Path(config.out) / "clients" / user_id


def simulated_device_round(
    config: SimulationConfig,
    user: int,
    round: int,
    global_params: dict[str, np.ndarray],
    *,
    draw_idle_noise: bool = True,
) -> LocalResult:
    """Round `round` (1-based) for the virtual device of dense user `user`: deliver the windows
    that arrived since its last round into its store, then run `local_round`.

    `draw_idle_noise=False`: a device known to be idle without opening its store owes its
    noise share instead of drawing it (`idle_result`), for `simulated_replies`."""
    model, index = template_for(config)
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    user_id = str(stream.dataset.user_ids[user])
    folder = client_dir(config, user_id)
    device = local_config(config, _seed(config, user))
    if not folder.exists() and not stream.deliveries(user, 0, round):
        # Nothing has arrived on this device yet: the reply an empty store would give, without
        # creating one (most devices sampled early in a run are still empty).
        reason = "no trainable example: nothing has arrived on this device yet"
        return idle_result(global_params, device, round, reason, draw_noise=draw_idle_noise)
    idle = _still_idle(folder, stream, user, round)
    if idle is not None:
        reason = "no trainable example: nothing new since the last round it had nothing to train"
        return idle_result(global_params, device, round, reason, idle, draw_noise=draw_idle_noise)
    result = _device_round(device, model, index, stream, user, folder, round, global_params)
    if result.idle_metrics is not None:
        _remember_idle(folder, round, result.idle_metrics)
    return result


# A simulated device that had nothing to train stays so until something new arrives: it
# only needs its noise (or a decline) again, not its store and ledger opened (most of a round
# of many idle devices). The marker is a cache, checked against the stream: it is trusted only
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
    stream = load_stream(config.data, config.rounds, config.stream_protocol)
    name = str(stream.dataset.user_ids[user])
    head = _last_hash(client_dir(config, name) / "ledger.jsonl") or "0" * 64
    return ledger_commitment(_commit_key(Path(config.out) / "clients"), name, round, head)


# Most replies come from devices whose ledger did not change since this process last read
# it (idle ones): its head is known while the file is the same one, of the same size and time.
_HEADS: dict[Path, tuple[tuple[int, int, int], str | None]] = {}


def _last_hash(path: Path) -> str | None:
    """The hash of a ledger's last entry, read from its last line (the ledger verified the
    chain when it appended it); None without entries."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    known = _HEADS.get(path)
    if known is not None and known[0] == identity:
        return known[1]
    head = _read_last_hash(path)
    if len(_HEADS) > 50_000:
        _HEADS.clear()
    _HEADS[path] = (identity, head)
    return head


def _read_last_hash(path: Path) -> str | None:
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


def device_reply(
    config: SimulationConfig, user: int, round: int, params, *, draw_idle_noise: bool = True
) -> DeviceReply:
    """A device's round with failures turned into a reply the server can count."""
    try:
        result = simulated_device_round(
            config, user, round, params, draw_idle_noise=draw_idle_noise
        )
    except Exception as err:
        head = device_commitment(config, user, round)
        return DeviceReply(
            user, None, 0, {}, error=f"{type(err).__name__}: {err}", ledger_head=head
        )
    return DeviceReply(
        user,
        result.params,
        result.num_examples,
        dict(result.metrics),
        ledger_head=device_commitment(config, user, round),
    )


def played_replies(
    config: SimulationConfig,
    users: list[int],
    round: int,
    params: dict[str, np.ndarray],
    *,
    draw_idle_noise: bool = True,
) -> list[DeviceReply]:
    """Each device of `users` plays round `round`: its own reply, or the attack's for a
    malicious device (`fedrec.simulations.attacks`), before any secure sum."""
    attackers = malicious_devices(config)

    def reply(user: int) -> DeviceReply:
        if user not in attackers:
            return device_reply(config, user, round, params, draw_idle_noise=draw_idle_noise)
        honest = None
        if config.attack in ("scale", "sign-flip"):  # the update it distorts
            honest = device_reply(config, user, round, params)
        return malicious_reply(config, user, round, params, honest)

    return [reply(user) for user in users]


def simulated_replies(
    config: SimulationConfig, users: list[int], round: int, params: dict[str, np.ndarray]
) -> list[DeviceReply]:
    """The devices of `users` play round `round`, and their replies become what the server may
    see: each device's own, or under secure aggregation their secure sum (`secure_sum`).
    Malicious devices (`fedrec.simulations.attacks`) send the attack's reply instead, which
    meets the same checks.

    Under secure aggregation most sampled devices are idle and send only a noise share; the
    server sees only the sum, so the idle devices' shares are drawn as one Gaussian vector
    (`secure_sum`'s `idle_noise`): the same distribution at a fraction of the cost. The
    draw is from the privacy randomness like each device's own (`privacy_source`)."""
    if not config.secure_aggregation:
        return played_replies(config, users, round, params)
    replies = played_replies(config, users, round, params, draw_idle_noise=False)
    if config.secagg:  # SecAgg+ over the round's DDG encodings, in this process
        return secagg_round(config, replies, round, params)
    share_std = local_config(config, None).update_noise_std()
    seed = config.seed if config.reproducible_noise else None

    def idle_noise(count: int) -> dict[str, np.ndarray]:
        randomness = privacy_randomness(seed, "idle-devices", round, min(users))
        values = list(params.values())
        noise = randomness.normal_like(values, share_std * math.sqrt(count), torch.float64)
        return {name: z.numpy() for name, z in zip(params, noise, strict=True)}

    bound = config.update_norm_bound(sum(v.size for v in params.values()))
    return secure_sum(replies, params, bound, idle_noise)


def run_in_process(
    config: SimulationConfig, on_round: Callable[[dict], None] | None = None
) -> FederatedRun:
    """The same run without Flower: devices are called one after another in this process.

    Used by tests and as the sequential baseline that simulation speed is compared with."""
    run = FederatedRun(config)

    def send_round(round: int, users: list[int], params: dict[str, np.ndarray]):
        return simulated_replies(config, [int(u) for u in users], round, params)

    run_rounds(run, send_round, on_round=on_round)
    return run

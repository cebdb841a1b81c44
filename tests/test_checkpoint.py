"""Server checkpoints: round trip, atomic commit, corruption, fallback, pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedrec.server.aggregation import ServerOptConfig, init_server_state
from fedrec.server.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)


def params(x: float) -> dict[str, np.ndarray]:
    return {
        "ctx.weight": np.full((2, 3), x, dtype=np.float32),
        "bias": np.asarray([x, -x], dtype=np.float32),
    }


def adam_state(x: float):
    state = init_server_state(params(0), ServerOptConfig(name="fedadam"))
    return type(state)(
        steps=int(x),
        m={k: v + x for k, v in state.m.items()},
        v={k: v + 2 * x for k, v in state.v.items()},
    )


def save_rounds(run_dir, rounds, **kwargs):
    for r in rounds:
        save_checkpoint(run_dir, r, params(r), adam_state(r), {"round_note": f"r{r}"}, **kwargs)


def test_round_trip(tmp_path):
    extra = {"user_privacy": {"rounds": [{"round": 1, "z": 1.1}]}, "seed": 7}
    state = adam_state(3)
    path = save_checkpoint(tmp_path, 3, params(3.5), state, extra)
    assert path == checkpoint_dir(tmp_path) / "round-0003.npz"
    ckpt = load_latest(tmp_path)
    assert ckpt is not None and ckpt.round == 3 and ckpt.path == path and ckpt.skipped == ()
    assert list(ckpt.params) == ["ctx.weight", "bias"]  # order kept
    for k, v in params(3.5).items():
        assert ckpt.params[k].dtype == np.float32 and np.array_equal(ckpt.params[k], v)
    assert ckpt.opt_state.steps == 3
    for k in state.m:
        assert np.array_equal(ckpt.opt_state.m[k], state.m[k])
        assert np.array_equal(ckpt.opt_state.v[k], state.v[k])
    assert ckpt.extra == extra
    latest = json.loads((checkpoint_dir(tmp_path) / "latest.json").read_text())
    assert latest == {"round": 3, "file": "round-0003.npz"}


def test_fedavg_state_round_trip(tmp_path):
    save_checkpoint(tmp_path, 0, params(1), init_server_state(params(1), ServerOptConfig()), {})
    ckpt = load_latest(tmp_path)
    assert ckpt.opt_state.steps == 0 and ckpt.opt_state.m == {} and ckpt.opt_state.v == {}


def test_nothing_saved_is_none(tmp_path):
    assert load_latest(tmp_path) is None


def test_resume_picks_the_committed_latest(tmp_path):
    save_rounds(tmp_path, [1, 2, 3])
    ckpt = load_latest(tmp_path)
    assert ckpt.round == 3 and ckpt.extra == {"round_note": "r3"}
    assert np.array_equal(ckpt.params["bias"], params(3)["bias"])
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [
        "latest.json",
        "round-0001.npz",
        "round-0002.npz",
        "round-0003.npz",
    ]


def test_leftover_temp_file_is_ignored_and_cleaned(tmp_path):
    save_rounds(tmp_path, [1, 2])
    folder = checkpoint_dir(tmp_path)
    stray = folder / ".tmp-round-0003.npz.ab12cd"  # a crash mid-write of round 3
    stray.write_bytes(b"PK\x03\x04 half a zip")
    assert load_latest(tmp_path).round == 2
    save_rounds(tmp_path, [3])
    assert not stray.exists() and load_latest(tmp_path).round == 3


def test_uncommitted_round_file_is_ignored(tmp_path):
    save_rounds(tmp_path, [1, 2])
    folder = checkpoint_dir(tmp_path)
    pointer = (folder / "latest.json").read_bytes()
    save_rounds(tmp_path, [3])
    (folder / "latest.json").write_bytes(pointer)  # as if the crash came before the commit
    assert load_latest(tmp_path).round == 2


def test_without_latest_json_the_newest_round_file_is_taken(tmp_path):
    save_rounds(tmp_path, [1, 2])
    (checkpoint_dir(tmp_path) / "latest.json").unlink()
    assert load_latest(tmp_path).round == 2


def corrupt(path, at=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_names_the_file(tmp_path):
    save_rounds(tmp_path, [1, 2, 3])
    bad = checkpoint_dir(tmp_path) / "round-0003.npz"
    corrupt(bad, at=0.3)
    with pytest.raises(CheckpointError, match=r"round-0003\.npz: corrupted or truncated"):
        load_latest(tmp_path)
    with pytest.raises(CheckpointError, match=r"round-0003\.npz"):
        load_checkpoint(bad)


def test_truncated_checkpoint_names_the_file(tmp_path):
    save_rounds(tmp_path, [1, 2])
    bad = checkpoint_dir(tmp_path) / "round-0002.npz"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"round-0002\.npz: corrupted or truncated"):
        load_latest(tmp_path)


def test_fallback_only_when_asked(tmp_path):
    save_rounds(tmp_path, [1, 2, 3])
    corrupt(checkpoint_dir(tmp_path) / "round-0003.npz", at=0.3)
    corrupt(checkpoint_dir(tmp_path) / "round-0002.npz", at=0.3)
    ckpt = load_latest(tmp_path, fallback=True)
    assert ckpt.round == 1 and ckpt.extra == {"round_note": "r1"}
    assert len(ckpt.skipped) == 2 and "round-0003.npz" in ckpt.skipped[0]
    # The next save repairs the run: round 2 again (>= the restored round) commits fine.
    save_rounds(tmp_path, [2])
    assert load_latest(tmp_path).round == 2


def test_corrupted_latest_json(tmp_path):
    save_rounds(tmp_path, [1, 2])
    (checkpoint_dir(tmp_path) / "latest.json").write_text('{"round": ')
    with pytest.raises(CheckpointError, match=r"latest\.json"):
        load_latest(tmp_path)
    assert load_latest(tmp_path, fallback=True).round == 2
    save_rounds(tmp_path, [3])  # a save overwrites the broken pointer
    assert load_latest(tmp_path).round == 3


def test_no_readable_checkpoint_at_all(tmp_path):
    save_rounds(tmp_path, [1])
    corrupt(checkpoint_dir(tmp_path) / "round-0001.npz", at=0.3)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        load_latest(tmp_path, fallback=True)


def test_keep_last_prunes_older_rounds(tmp_path):
    save_rounds(tmp_path, [1, 2, 3, 4], keep_last=2)
    names = sorted(p.name for p in checkpoint_dir(tmp_path).glob("round-*.npz"))
    assert names == ["round-0003.npz", "round-0004.npz"]
    assert load_latest(tmp_path).round == 4


def test_refuses_to_go_back_in_rounds(tmp_path):
    save_rounds(tmp_path, [5])
    with pytest.raises(ValueError, match="older than the committed"):
        save_rounds(tmp_path, [1])
    save_rounds(tmp_path, [5])  # the same round again is allowed (a resumed, redone round)


def test_bad_inputs(tmp_path):
    state = init_server_state(params(0), ServerOptConfig())
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path, 1, params(1), state, {"x": object()})
    with pytest.raises(ValueError, match="float32"):
        save_checkpoint(tmp_path, 1, {"w": np.zeros(2)}, state, {})
    assert load_latest(tmp_path) is None  # nothing was half-written

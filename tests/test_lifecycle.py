"""A run's processes live and die with it, and one process writes a run folder at a time.

Real processes: `fedrec simulate` through Flower (a private SuperLink, superexec, Ray) started
in its own session like a shell job, then signalled; the lock and the watchdog on their own
with plain Python children. A run's processes are found by the FLWR_HOME the launcher gives
them (inside the run folder), whatever their parent or session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedrec.common.processes import RUN_TOKEN_ENV, environ_of, processes_with
from fedrec.common.run_lock import LOCK_FILE, RunLock, RunLocked, RunLockLost, WriterGuard

SMALL = {
    "dataset": "synthetic",
    "synthetic": "num_users=120,num_items=60,mean_interactions_per_user=12,seed=2",
    # rounds enough that a run signalled after its first round is still running
    "rounds": 6,
    "clients-per-round": 40,
    "min-survivors": 3,
}


def run_processes(out: Path) -> list[psutil.Process]:
    """Live processes whose FLWR_HOME lies in `out` (the launcher's Flower, Ray and logs)."""
    found = []
    for process in psutil.process_iter():
        try:
            home = process.environ().get("FLWR_HOME", "")
            if home.startswith(str(out)) and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            continue
    return found


def alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def commands(processes: list[psutil.Process]) -> list[str]:
    """Their command lines, leaving out those that ended meanwhile."""
    lines = []
    for process in processes:
        try:
            lines.append(" ".join(process.cmdline()))
        except psutil.Error:
            continue
    return lines


def wait_until(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


def lock_holder(out: Path) -> int:
    try:
        return json.loads((out / LOCK_FILE).read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return 0


def rows(out: Path) -> int:
    metrics = out / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


class Simulate:
    """`fedrec simulate` on the SMALL run through Flower, as a shell job in its own session."""

    def __init__(self, tmp_path: Path, out: Path, *extra: str, name: str = "run"):
        self.out, self.log = out, tmp_path / f"{name}.log"
        args = [sys.executable, "-m", "fedrec.cli", "simulate", "--out", str(out)]
        for key, value in SMALL.items():
            args += [f"--{key}", str(value)]
        env = os.environ | {"FEDREC_CACHE_DIR": str(tmp_path / "cache")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*args, *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_for_round(self, after: int = 0, timeout: float = 240) -> None:
        """Until metrics.jsonl has a row past `after` (the run is training through Flower)."""
        done = wait_until(lambda: rows(self.out) > after or self.proc.poll() is not None, timeout)
        assert done and self.proc.poll() is None, self.output()

    def output(self) -> str:
        return self.log.read_text()[-4000:]

    def stop(self) -> None:  # whatever a failed assertion left behind
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for process in run_processes(self.out):  # only if the code under test failed
            process.kill()


def signal_and_time(run: Simulate, sig: int) -> tuple[int, float]:
    """Signal the job's process group (as a terminal does); (exit status, seconds to exit)."""
    start = time.monotonic()
    os.killpg(run.proc.pid, sig)
    status = run.proc.wait(60)
    return status, time.monotonic() - start


def test_sigint_stops_the_run_within_seconds_with_a_message(tmp_path):
    out = tmp_path / "run"
    run = Simulate(tmp_path, out)
    try:
        run.wait_for_round()
        assert run_processes(out)  # the check below would see Flower's processes
        status, seconds = signal_and_time(run, signal.SIGINT)
        assert status == 130, run.output()
        assert seconds < 3.0, f"{seconds:.1f}s"
        print(f"SIGINT: exited {seconds:.2f}s after the signal")
        assert "interrupted (SIGINT) at round" in run.output()
        assert "resume with --resume" in run.output()
        assert "Traceback" not in run.output()
        assert wait_until(lambda: not run_processes(out), 2.0)
        # released cleanly: the next writer takes the folder without a takeover
        assert (out / LOCK_FILE).read_text() == ""
    finally:
        run.stop()


def test_sigterm_stops_every_process_the_run_started(tmp_path):
    out = tmp_path / "run"
    run = Simulate(tmp_path, out)
    try:
        run.wait_for_round()
        started = run_processes(out)
        assert any("flower-superlink" in line for line in commands(started))
        assert any("flower-superexec" in line for line in commands(started))
        os.kill(run.proc.pid, signal.SIGTERM)  # the launcher alone, as a service manager does
        start = time.monotonic()
        status = run.proc.wait(60)
        print(f"SIGTERM: exited {time.monotonic() - start:.2f}s after the signal")
        assert status == 128 + signal.SIGTERM, run.output()
        assert "interrupted (SIGTERM)" in run.output()
        left = wait_until(lambda: not run_processes(out), 3.0)
        assert left, commands(run_processes(out))
        # a killed process may still be exiting (its environment already gone)
        assert wait_until(lambda: not any(alive(p) for p in started), 3.0), commands(started)
    finally:
        run.stop()


@pytest.mark.timeout(600)  # two Flower start-ups (~30 s each on 2 idle cores)
def test_killed_run_takes_its_children_along_and_resumes_alone(tmp_path):
    out = tmp_path / "run"
    run = Simulate(tmp_path, out)
    try:
        # a second writer is refused while the first runs (its lock taken), naming it
        assert wait_until(lambda: run.proc.pid == lock_holder(out), 120), run.output()
        second = Simulate(tmp_path, out, "--resume", name="second")
        assert second.proc.wait(120) == 2, second.output()
        assert f"in use by process {run.proc.pid} (fedrec simulate)" in second.output()
        run.wait_for_round()
        started = run_processes(out)
        assert started
        os.kill(run.proc.pid, signal.SIGKILL)  # uncatchable: the watchdog acts
        run.proc.wait()
        start = time.monotonic()
        assert wait_until(lambda: not run_processes(out), 10.0), commands(run_processes(out))
        print(f"children gone {time.monotonic() - start:.1f}s after SIGKILL")
        killed_at = rows(out)
        assert killed_at < SMALL["rounds"]
        # nothing trains the folder any more: no new round appears
        time.sleep(1.0)
        assert rows(out) == killed_at
        resumed = Simulate(tmp_path, out, "--resume", name="resumed")
        assert resumed.proc.wait(400) == 0, resumed.output()
        assert "taking over the lock of process" in resumed.output()
    finally:
        run.stop()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, SMALL["rounds"] + 1))
    ledgers = sorted((out / "clients").glob("*/ledger.jsonl"))
    assert ledgers
    for path in ledgers:
        entries = [json.loads(line) for line in path.read_text().splitlines()]
        assert [e["seq"] for e in entries] == list(range(len(entries))), path
        rounds = [e["round"] for e in entries]
        assert rounds == sorted(rounds), path  # no round written twice, none out of order
        trained = [e["round"] for e in entries if e["kind"] == "train"]
        assert len(trained) == len(set(trained)), path


# -- the pieces on their own: plain Python processes, no Flower --------------------------------

HOLD = (
    "import sys, time; from pathlib import Path; from fedrec.common.run_lock import RunLock; "
    "lock = RunLock.acquire(Path(sys.argv[1]), command='holder'); "
    "print(lock.token, flush=True); time.sleep(120)"
)


def test_the_lock_names_its_live_holder_and_is_taken_over_when_it_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        token = holder.stdout.readline().strip()
        with pytest.raises(RunLocked, match=f"in use by process {holder.pid} \\(holder\\)"):
            RunLock.acquire(tmp_path, command="second")
        WriterGuard(tmp_path, token).check()  # the launcher's ServerApp may write
        with pytest.raises(RunLockLost, match="no longer holds"):
            WriterGuard(tmp_path, "another launch")
        holder.kill()
        holder.wait()
        # a ServerApp orphaned by its launcher stops before its next round
        with pytest.raises(RunLockLost, match=f"launched this run \\({holder.pid}\\) is gone"):
            WriterGuard(tmp_path, token)
        said = []
        with RunLock.acquire(tmp_path, command="next", notify=said.append) as lock:
            assert lock.holder.pid == os.getpid() and lock.token != token
            assert said == [
                f"{tmp_path}: taking over the lock of process {holder.pid} (holder), which "
                "ended without releasing it"
            ]
        said.clear()
        RunLock.acquire(tmp_path, command="after a clean release", notify=said.append).release()
        assert said == []
    finally:
        holder.kill()
        holder.wait()


LAUNCHER = """
import subprocess, sys, time
from pathlib import Path
from fedrec.common.processes import RUN_TOKEN_ENV, Watchdog
from fedrec.common.run_lock import RunLock
lock = RunLock.acquire(Path(sys.argv[1]), command="launcher")
watchdog = Watchdog(lock.token, lock.fileno(), grace=0.5)
lock.record_watchdog(watchdog.pid)
env = {RUN_TOKEN_ENV: lock.token, "PATH": ""}
# a child in its own session that starts a grandchild ignoring SIGTERM (as Ray's agents do)
grandchild = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
child = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {grandchild!r}]); time.sleep(120)"
subprocess.Popen([sys.executable, "-c", child], env=env, start_new_session=True)
print(lock.token, flush=True)
time.sleep(120)
"""


def test_the_watchdog_stops_a_killed_launchers_processes_then_frees_the_folder(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        token = launcher.stdout.readline().strip()
        assert wait_until(lambda: len(processes_with(RUN_TOKEN_ENV, token)) == 2, 10)
        launcher.kill()
        launcher.wait()
        # the folder stays locked until they are gone: a new writer waits, then takes it over
        said = []
        start = time.monotonic()
        lock = RunLock.acquire(tmp_path, command="next", notify=said.append, cleanup_wait=20)
        waited = time.monotonic() - start
        lock.release()
        assert processes_with(RUN_TOKEN_ENV, token) == []
        assert "is gone; waiting for the processes it started to stop" in said[0], said
        assert "taking over the lock of process" in said[-1], said
        assert waited < 5.0, waited
    finally:
        launcher.kill()
        launcher.wait()
        for process in processes_with(RUN_TOKEN_ENV, token):
            process.kill()


def test_server_start_holds_its_folder_and_stops_its_superlink_on_sigterm(tmp_path):
    from fedrec.common.flower_launch import free_port

    (tmp_path / "run.toml").write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {free_port()}\ninsecure = true\nout = "run"\n'
        f'database = "state.db"\n[run]\ndataset = "synthetic"\nsynthetic = "{SMALL["synthetic"]}"\n'
        "rounds = 2\nwait-nodes-s = 600\n"
    )
    env = os.environ | {"FEDREC_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "fedrec.cli", "server", "start", "--config", "run.toml"]
    out, log = tmp_path / "run", tmp_path / "server.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:  # submitted: the SuperLink waits for devices that never come
        assert wait_until(lambda: "submitted" in log.read_text() or server.poll(), 240)
        assert server.poll() is None, log.read_text()
        second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"in use by process {server.pid} (fedrec server start)" in second.stderr
        started = run_processes(out)
        assert any("flower-superlink" in line for line in commands(started))
        os.kill(server.pid, signal.SIGTERM)
        assert server.wait(60) == 128 + signal.SIGTERM, log.read_text()
        assert "interrupted (SIGTERM) at round 1 of 2" in log.read_text()
        assert wait_until(lambda: not run_processes(out), 3.0)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        for process in run_processes(out):
            process.kill()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux procfs")
def test_a_child_whose_token_cannot_be_read_is_stopped_with_its_parent(tmp_path):
    """A starting Ray agent hid its whole environment from two sweeps and outlived its run
    (faults benchmark). Here a process of the run starts a child that wipes its whole
    environment block and ignores SIGTERM: the sweep reaches it through its parent."""
    from fedrec.common.processes import run_env, stop_run_processes

    child_code = (
        "import ctypes, signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "stat = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\n"
        "start, end = int(stat[47]), int(stat[48])  # fields 50 and 51: env_start, env_end\n"
        "ctypes.memset(start, 0, end - start)\n"
        "print('hidden', flush=True)\n"
        "time.sleep(120)\n"
    )
    parent_code = (
        "import subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    token = "hidden-" + os.urandom(8).hex()
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code], env=run_env(dict(os.environ), tmp_path, token),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = None
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert parent.stdout.readline().strip() == "hidden"
        assert RUN_TOKEN_ENV not in environ_of(child)  # the condition: unreadable by token
        assert [p.pid for p in processes_with(RUN_TOKEN_ENV, token)] == [parent.pid]
        assert stop_run_processes(token, grace=0.5, settle=0.5) == 2
        assert parent.wait(10) == -signal.SIGTERM
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert alive == []  # SIGKILLed after the grace: it ignored SIGTERM
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if child is not None:
            try:
                child.kill()
            except psutil.Error:
                pass


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="Linux procfs")
def test_a_process_that_renamed_itself_is_still_stopped_with_its_run(tmp_path):
    """Ray's dashboard and runtime-env agents rename themselves (setproctitle), which zeroes
    the start of their environment block; psutil's parser stops at the first empty entry and
    saw no environment, so the agents outlived every stop of the run, the watchdog's included
    (faults benchmark). Here a child zeroes its block's first bytes as setproctitle does."""
    from fedrec.common.processes import run_env, stop_run_processes

    code = (
        "import ctypes, time\n"
        "stat = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\n"
        "ctypes.memset(int(stat[47]), 0, 256)  # field 50, env_start\n"
        "print('renamed', flush=True)\n"
        "time.sleep(120)\n"
    )
    token = "renamed-" + os.urandom(8).hex()
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=run_env(dict(os.environ), tmp_path, token),
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "renamed"
        assert RUN_TOKEN_ENV not in psutil.Process(child.pid).environ()  # the condition
        assert [p.pid for p in processes_with(RUN_TOKEN_ENV, token)] == [child.pid]
        assert stop_run_processes(token, grace=1.0) == 1
        assert child.wait(10) == -signal.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

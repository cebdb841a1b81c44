"""A warm executor for a device's ClientApp: one long-lived process that has imported torch,
Opacus, Flower and fedrec (and read the public catalogue) once, and forks a child per message.

Flower 1.42's SuperNode runs every message in a new `flwr-clientapp` process that imports all
of that again (its cost: README, Deployment). With `flower-supernode --isolation process`
the SuperNode runs no executor itself; this module is Flower's own SuperExec loop
(`run_superexec`: poll the SuperNode's Runtime API for a task, launch it) with two changes: a
task is launched by `os.fork()` of this warm process, and the child runs Flower's own
`run_clientapp` (the same code `flwr-clientapp` runs) and exits; and the loop's sleep between
polls ends when the SuperNode signals that a message arrived (`WakeableSleep`). A message
still gets a fresh process (a crash or a leak in one round cannot touch the next), without
the imports.

Run as `python -m fedrec.client.warm_exec --runtime-api-address HOST:PORT [--parent-pid PID]`
(`fedrec client start` does it). Every use of Flower's internals goes through
`fedrec.common.flower_patches`; on a Flower version they were not verified on, this process
becomes Flower's own `flower-superexec` (a new process per message) instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedrec.common import flower_patches


def _warm_template(used: dict) -> None:
    """Build the model template a message used (`device_app.last_run_settings`), so the next
    message's child forks with it ready."""
    from fedrec.client.runtime import device_template
    from fedrec.common.run_config import SimulationConfig

    catalogue = Path(used["catalogue"]) if used.get("catalogue") else None
    config = SimulationConfig.from_flat(used.get("run", {}))
    device_template(config, catalogue, used.get("digest", ""))


def _warm_up(rounds_hint: int | None = None, catalogue: str | None = None) -> None:
    """Import what a round needs and read the public catalogue, before any fork."""
    import torch

    flower_patches.shorten_pull_backoff()
    torch.set_num_threads(1)
    # the first optimizer imports torch._dynamo, a slow import: once, here
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    import opacus  # noqa: F401
    from opacus.grad_sample import (  # noqa: F401
        GradSampleModuleExpandedWeights,
        GradSampleModuleFastGradientClipping,
    )

    import fedrec.client.app
    import fedrec.client.device_round
    import fedrec.client.training  # noqa: F401

    # the device's public catalogue file, or the model template of the default dataset; a
    # run's own model is warmed after its first message (see ForkExecutor.reconcile)
    try:
        if catalogue:
            from fedrec.client.runtime import read_catalogue_file

            read_catalogue_file(Path(catalogue))
        else:
            _warm_template({"run": {} if rounds_hint is None else {"rounds": rounds_hint}})
    except Exception as err:  # the rounds report it; this process only starts colder
        print(f"warm_exec: could not pre-load the catalogue: {err}", file=sys.stderr)


class WakeableSleep:
    """The `time` module as Flower's SuperExec loop sees it, whose sleep ends early on SIGUSR1
    (sent by the SuperNode when a message arrives). The signal handler writes to a pipe and the
    sleep waits on it with select: a signal that comes before the sleep starts still ends it."""

    def __init__(self) -> None:
        import signal

        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    def __getattr__(self, name: str):
        import time

        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        import select

        ready, _, _ = select.select([self._read], [], [], seconds)
        if ready:
            try:
                while os.read(self._read, 4096):
                    pass
            except BlockingIOError:
                pass


class ForkExecutor:
    """Flower's executor interface (see flwr.supercore.superexec.executor): ClientApp tasks
    are forked from this warm process; any other task type falls back to a subprocess."""

    def __init__(self) -> None:
        self._fallback = flower_patches.subprocess_executor()
        self._children: set[int] = set()
        # a child reports the run settings it used here; the parent then builds that model
        # template once, so the next messages of the run fork with it ready
        self._hint_fd_read, self._hint_fd_write = os.pipe()
        os.set_blocking(self._hint_fd_read, False)
        self._warmed: set[str] = set()

    def get_eligible_capacity(self, supported_task_types, **kwargs):
        return self._fallback.get_eligible_capacity(supported_task_types, **kwargs)

    def wait_for_capacity(self, *args, **kwargs) -> None:
        return None

    def launch(self, spec):
        if not flower_patches.is_clientapp_task(spec):
            return self._fallback.launch(spec)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: run this one message, then leave without cleanup handlers
            code = 0
            try:
                import signal

                signal.signal(signal.SIGUSR1, signal.SIG_DFL)
                _die_with(parent)
                run = lambda: flower_patches.run_clientapp_task(spec)  # noqa: E731
                profile = os.environ.get("FEDREC_WARM_PROFILE")  # a folder: one profile per message
                if profile:
                    import cProfile

                    profiler = cProfile.Profile()
                    try:
                        profiler.runcall(run)
                    finally:
                        profiler.dump_stats(os.path.join(profile, f"message-{os.getpid()}.prof"))
                else:
                    run()
            except SystemExit as done:
                code = done.code if isinstance(done.code, int) else 0
            except BaseException:
                code = 1
            finally:
                self._report_settings()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self._children.add(pid)
        return flower_patches.launch_accepted()

    def _report_settings(self) -> None:
        import json

        from fedrec.client import device_app

        if device_app.last_run_settings:
            line = json.dumps(device_app.last_run_settings[-1], sort_keys=True) + "\n"
            if len(line) < 4000:  # one atomic pipe write
                os.write(self._hint_fd_write, line.encode())

    def _warm_reported(self) -> None:
        import json

        try:
            data = os.read(self._hint_fd_read, 1 << 16)
        except BlockingIOError:
            return
        for line in data.decode(errors="replace").splitlines():
            if line and line not in self._warmed:
                self._warmed.add(line)
                try:
                    _warm_template(json.loads(line))
                except Exception as err:
                    print(f"warm_exec: could not warm {line[:80]}: {err}", file=sys.stderr)

    def reconcile(self) -> None:
        self._warm_reported()
        for pid in list(self._children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.discard(pid)

    def close(self) -> None:
        self._fallback.close()


def _die_with(parent: int) -> None:
    """Have the kernel stop this forked message worker when the executor dies (Linux: a fork
    does not inherit PR_SET_PDEATHSIG, so a device killed mid-round would leave its worker
    running); elsewhere the worker's --parent-pid watch covers it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the executor died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--rounds-hint", type=int, default=None)
    parser.add_argument("--catalogue", default=None, help="the device's public catalogue file")
    parser.add_argument(
        "--pidfile", default=None, help="written once this process can be woken (SIGUSR1)"
    )
    args = parser.parse_args(argv)
    if not flower_patches.patches_apply():  # stock Flower: no warm-up, a process per message
        flower_patches.exec_stock_executor(args.runtime_api_address, args.parent_pid)
    # First the SIGUSR1 handler, then the PID where the SuperNode reads it: a wake-up before
    # the handler exists would kill this process (SIGUSR1's default action).
    sleep = WakeableSleep()
    if args.pidfile:
        tmp = args.pidfile + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, args.pidfile)
    # How often this loop asks the SuperNode for a task when nobody wakes it: the SuperNode
    # wakes it when a message arrives (SIGUSR1, fedrec.client.supernode), so this poll is a
    # fallback. Polling alone costs latency (half the interval per message) or, fast enough
    # to hide it, the CPU co-located devices need (benchmarks/results/: deployment-warm-10
    # against deployment-warm-10-exec-poll-0.05).
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "1.0")
    if args.parent_pid is not None:
        # Flower's loop watches the SuperNode only once it runs; the warm-up before it (torch,
        # the catalogue: tens of seconds on a busy device) must not outlive a SuperNode
        # killed meanwhile
        flower_patches.watch_parent(args.parent_pid)
    _warm_up(args.rounds_hint, args.catalogue)
    # Flower's loop with our executor, and its poll's sleep ends when the SuperNode wakes it
    flower_patches.serve_tasks(ForkExecutor(), sleep, args.runtime_api_address, args.parent_pid)


if __name__ == "__main__":
    main()

"""Run one `lmu-jax` command as N local processes over jax.distributed (the pod code path on one host).

    python -m lmu_jax.launch_local --processes 2 --devices-per-process 4 -- train --config c.yaml

Each process gets ``LMU_JAX_COORDINATOR=127.0.0.1:<port>``, its ``LMU_JAX_PROCESS_ID`` and
``--xla_force_host_platform_device_count``. Output of process i goes to stdout prefixed ``[i]``; the
launcher's own lines are prefixed ``[launch]`` (each process's pid first).

When one process fails, the others normally stop by themselves: a collective with a dead peer fails,
or jax's coordination service misses its heartbeats for ``distributed.timeout_s`` and terminates
them. Whatever is left is stopped after ``--grace`` seconds: no hang. The launcher then says in one
line which process failed first and how (the survivors' own messages often only say that a peer is
gone), and exits with that process's code (128 + signal number for a signal).

SIGTERM to the launcher is passed on to every process (preemption: the run checkpoints and stops).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str, sink):
    for line in iter(stream.readline, ""):
        sink.write(f"{prefix}{line}")
        sink.flush()


def with_cpu_device_count(xla_flags: str, count: int) -> str:
    """``xla_flags`` (an XLA_FLAGS value) with its fake CPU device count set to ``count``, the rest kept."""
    flags = [f for f in xla_flags.split() if "device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


def launch(command: list[str], processes: int, devices_per_process: int, grace: float = 60.0,
           env: dict | None = None) -> int:
    port = free_port()
    procs, pumps = [], []
    for index in range(processes):
        proc_env = dict(os.environ if env is None else env)
        proc_env.update(
            XLA_FLAGS=with_cpu_device_count(proc_env.get("XLA_FLAGS", ""), devices_per_process),
            JAX_PLATFORMS="cpu", LMU_JAX_COORDINATOR=f"127.0.0.1:{port}",
            LMU_JAX_NUM_PROCESSES=str(processes), LMU_JAX_PROCESS_ID=str(index),
        )
        proc = subprocess.Popen([sys.executable, "-m", "lmu_jax.cli", *command], env=proc_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        print(f"[launch] process {index}: pid {proc.pid}", flush=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{index}] ", sys.stdout), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward) if threading.current_thread() is threading.main_thread() \
        else None
    ended, stopped = {}, set()  # process index -> time it ended; the ones the launcher killed
    try:
        while len(ended) < len(procs):
            for index, p in enumerate(procs):
                if index not in ended and p.poll() is not None:
                    ended[index] = time.monotonic()
            failures = [t for i, t in ended.items() if procs[i].returncode != 0]
            if failures and time.monotonic() - min(failures) > grace:
                for index, p in enumerate(procs):
                    if p.poll() is None:
                        p.kill()
                        stopped.add(index)
            time.sleep(0.2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    for pump in pumps:
        pump.join(timeout=5)
    failed = sorted((t, i) for i, t in ended.items() if procs[i].returncode != 0)
    if not failed:
        return 0
    t0, first = failed[0]
    later = [f"process {i} {_how(procs[i].returncode)} {t - t0:.1f} s later"
             + (f" (stopped by the launcher after --grace {grace:g} s)" if i in stopped else "")
             for t, i in failed[1:]]
    code = procs[first].returncode
    hint = "" if code in (2, 3) else "; run the same command again to resume from the run's last checkpoint"
    print(f"error: process {first} (pid {procs[first].pid}) {_how(code)} first"  # (2, 3: its own message says why)
          + "".join(f"; {text}" for text in later) + hint, file=sys.stderr, flush=True)
    return 128 - code if code < 0 else code


def _how(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument("--grace", type=float, default=60.0, help="seconds the others get after one fails")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the lmu-jax command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.processes < 1 or args.devices_per_process < 1 or not command:
        print("error: --processes and --devices-per-process must be >= 1 and a command given after --",
              file=sys.stderr)
        return 2
    return launch(command, args.processes, args.devices_per_process, args.grace)


if __name__ == "__main__":
    sys.exit(main())

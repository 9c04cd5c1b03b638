"""Run one `lmu-jax` command as N local processes over jax.distributed (the pod code path on one host).

    python -m lmu_jax.launch_local --processes 2 --devices-per-process 4 -- train --config c.yaml

Each process gets ``LMU_JAX_COORDINATOR=127.0.0.1:<port>``, its ``LMU_JAX_PROCESS_ID`` and
``--xla_force_host_platform_device_count``. Output of process i goes to stdout prefixed ``[i]``.
When one process fails, the others are given ``--grace`` seconds and then stopped: no hang.
"""

from __future__ import annotations

import argparse
import os
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


def launch(command: list[str], processes: int, devices_per_process: int, grace: float = 60.0,
           env: dict | None = None) -> int:
    port = free_port()
    procs, pumps = [], []
    for index in range(processes):
        proc_env = dict(os.environ if env is None else env)
        flags = [f for f in proc_env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        proc_env.update(
            XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]),
            JAX_PLATFORMS="cpu", LMU_JAX_COORDINATOR=f"127.0.0.1:{port}",
            LMU_JAX_NUM_PROCESSES=str(processes), LMU_JAX_PROCESS_ID=str(index),
        )
        proc = subprocess.Popen([sys.executable, "-m", "lmu_jax.cli", *command], env=proc_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        pump = threading.Thread(target=_pump, args=(proc.stdout, f"[{index}] ", sys.stdout), daemon=True)
        pump.start()
        procs.append(proc)
        pumps.append(pump)
    failed_at = None
    while any(p.poll() is None for p in procs):
        codes = [p.poll() for p in procs]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.2)
    for pump in pumps:
        pump.join(timeout=5)
    codes = [p.returncode for p in procs]
    return next((c for c in codes if c != 0), 0)


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

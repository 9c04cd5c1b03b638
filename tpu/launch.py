"""Launch lmu_jax jobs on Cloud TPU slices (python -m tpu.launch <command> ...).

    slices    the slice table: chips, hosts, devices per host, runtime version
    create    create a slice as a queued resource and wait until it is ACTIVE
    status    the queued resource's state and its node's state
    install   install the project (git ref or wheel) + jax[tpu] on every worker
    run       run a command once on every worker at once (the slice must be ACTIVE)
    babysit   create + install + run, recreating the slice and relaunching after preemptions
    sweep     take a sweep's runs from a shared lease queue and babysit them one by one on this slice
    delete    delete the slice

Every gcloud call goes through one runner; ``--dry-run`` prints each command (one shell-quoted line, in
order) and changes nothing. Bad input: one ``error:`` line, exit code 2. A run-time failure (gave up,
the job failed): exit code 1. See tpu/README.md for the walk-through.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import sys
from pathlib import Path

from lmu_jax.cli import ArgumentParser  # argparse that raises UserError (one line, exit 2)
from lmu_jax.errors import EXIT_USER_ERROR, UserError, bad_value
from tpu.babysit import Babysitter, LaunchError, Outcome, RetryPolicy, Slice, last_line
from tpu.gcloud import PROVISIONING, CreateOptions, InstallSource, JobEnv, SliceTarget
from tpu.runner import Clock, DryRunner, Result, SubprocessRunner, log, render
from tpu.slices import parse_slice, slice_table
from tpu.sweep_queue import Leases, SweepQueue, check_run_id, open_store

EXIT_FAILED = 1
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")  # GCP resource names
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
DRY_RUN_RUN_ID = "RUN_ID"


# ---- arguments -> settings (each check raises UserError: one line, exit code 2) -------------------

def _positive(field: str, value: float, allowed: str = "must be > 0") -> float:
    if not value > 0:
        raise bad_value(field, value, allowed)
    return value


def target_from(args) -> SliceTarget:
    if not args.slice:
        raise UserError("--slice is required: a TPU slice such as v4-32, v5litepod-256, v5p-128 or v6e-8")
    spec = parse_slice(args.slice)
    for flag, value in (("--zone", args.zone), ("--project", args.project)):
        if not value:
            raise UserError(f"{flag} is required (the {flag[2:]} that holds your TPU quota)")
    name = args.name or f"lmu-{spec.accelerator_type}"
    if not NAME.fullmatch(name):
        raise bad_value("--name", name, "lowercase letters, digits and hyphens, starting with a letter, "
                        "at most 63 characters")
    return SliceTarget(name, args.zone, args.project, spec, internal_ip=args.internal_ip)


def create_options_from(args) -> CreateOptions:
    return CreateOptions(args.provisioning, args.runtime_version, args.service_account)


def source_from(args, *, required: bool) -> InstallSource:
    """Where the workers get the code. ``run`` only needs to know the working directory."""
    if args.repo and args.wheel:
        raise UserError("give either --repo (git) or --wheel, not both")
    if required and not (args.repo or args.wheel):
        raise UserError("--repo URL (with --ref) or --wheel PATH is required: where the workers get the code")
    if args.wheel and not (args.wheel.endswith(".whl") and Path(args.wheel).is_file()):
        raise bad_value("--wheel", args.wheel, "must be an existing .whl file (build one with `pip wheel . -w dist`)")
    for path in args.copy:
        if not Path(path).is_file():
            raise bad_value("--copy", path, "must be an existing file")
    if args.copy and not args.wheel:
        raise UserError("--copy is for --wheel installs; with --repo the workers have the whole checkout")
    return InstallSource(repo=args.repo, ref=args.ref, wheel=args.wheel, copies=tuple(args.copy),
                         python=args.python, jax_spec=args.jax_spec)


def env_from(args) -> JobEnv:
    variables = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not ENV_NAME.fullmatch(key):
            raise bad_value("--env", item, "expected NAME=VALUE, or NAME to pass this shell's value on")
        if not sep:
            if key not in os.environ:
                raise UserError(f"--env {key}: {key} is not set here; give a value with --env {key}=VALUE")
            value = os.environ[key]
        variables[key] = value
    if args.libtpu_init_args:
        variables["LIBTPU_INIT_ARGS"] = args.libtpu_init_args
    if args.compilation_cache:
        variables["JAX_COMPILATION_CACHE_DIR"] = args.compilation_cache
    return JobEnv(variables)


def policy_from(args) -> RetryPolicy:
    if args.max_retries < 1:
        raise bad_value("--max-retries", args.max_retries,
                        "must be at least 1 (use `run` for a single attempt without babysitting)")
    if args.backoff < 0 or args.backoff_max < args.backoff:
        raise bad_value("--backoff", args.backoff, f"must be >= 0 and <= --backoff-max ({args.backoff_max})")
    return RetryPolicy(args.max_retries, args.backoff, args.backoff_max)


def _after_dashes(words: list[str]) -> list[str]:
    return words[1:] if words[:1] == ["--"] else words


def job_command(args) -> list[str]:
    command = _after_dashes(args.job)
    if not command:
        raise UserError("give the command to run after --, e.g. "
                        "-- lmu-jax train --config CONFIG --run-dir gs://BUCKET/runs/NAME")
    return command


def slice_from(args, runner, clock, source=None) -> Slice:
    target = target_from(args)
    poll_s, timeout_s = _positive("--poll", args.poll), _positive("--create-timeout", args.create_timeout)
    if runner.dry_run:
        spec = target.spec
        runner.note(f"{spec.accelerator_type}: {spec.chips} chips, {spec.hosts} hosts x {spec.devices_per_host} "
                    f"devices, runtime {spec.runtime_version}")
    return Slice(target, create_options_from(args) if hasattr(args, "provisioning") else CreateOptions(),
                 source, runner, clock,
                 poll_s=poll_s, create_timeout_s=timeout_s, log_dir=Path(args.log_dir))


# ---- subcommands ----------------------------------------------------------------------------------

def cmd_slices(args, runner, clock) -> int:
    print(slice_table())
    return 0


def cmd_create(args, runner, clock) -> int:
    slice_from(args, runner, clock).ensure_active()
    return 0


def cmd_status(args, runner, clock) -> int:
    tpu = slice_from(args, runner, clock)
    state = tpu.state(dry_run_assumes="ACTIVE")
    problem = tpu.health_problem() if state == "ACTIVE" else None
    print(f"{tpu.name}: queued resource {state or 'not found'}"
          + ("" if state != "ACTIVE" else f", node {'healthy' if problem is None else problem}"))
    return 0


def cmd_delete(args, runner, clock) -> int:
    slice_from(args, runner, clock).delete()
    return 0


def cmd_install(args, runner, clock) -> int:
    slice_from(args, runner, clock, source_from(args, required=True)).install()
    return 0


def cmd_run(args, runner, clock) -> int:
    command, env = job_command(args), env_from(args)
    tpu = slice_from(args, runner, clock, source_from(args, required=False))
    state = tpu.state(dry_run_assumes="ACTIVE")
    if state != "ACTIVE":
        raise LaunchError(f"slice {tpu.name} is {state or 'not found'}: create it first "
                          "(python -m tpu.launch create ...), or use babysit")
    report = tpu.run_job(command, env)
    log(f"{report.outcome.value}: {report.detail}")
    return 0 if report.outcome is Outcome.SUCCEEDED else EXIT_FAILED


def _print_recovery(runner, tpu: Slice, command: list[str], env: JobEnv, policy: RetryPolicy) -> None:
    if runner.dry_run:
        runner.note(f"after a preemption (queued resource SUSPENDED/FAILED, node not READY, or a worker gone) "
                    f"the babysitter runs, up to {policy.max_retries} times, backoff {policy.backoff_s:.0f} s "
                    f"doubling to {policy.backoff_max_s:.0f} s:")
        for argv in tpu.recovery_commands(command, env):
            runner.note("  " + render(argv))


def cmd_babysit(args, runner, clock) -> int:
    command, env, policy = job_command(args), env_from(args), policy_from(args)
    tpu = slice_from(args, runner, clock, source_from(args, required=True))
    Babysitter(tpu, policy, clock).run(command, env)
    _print_recovery(runner, tpu, command, env, policy)
    return 0


def cmd_sweep(args, runner, clock) -> int:
    source = source_from(args, required=True)
    if not Path(args.spec).is_file():
        raise bad_value("--spec", args.spec, "must be an existing sweep spec file")
    remote_spec = args.spec
    if source.wheel is not None:  # no checkout on the workers: ship the spec next to the wheel
        source = dataclasses.replace(source, copies=(*source.copies, args.spec))
        remote_spec = Path(args.spec).name
    env, policy = env_from(args), policy_from(args)
    ttl, queue_poll = _positive("--lease-ttl", args.lease_ttl), _positive("--queue-poll", args.queue_poll)
    extra = _after_dashes(args.job)
    tpu = slice_from(args, runner, clock, source)

    plan = runner.run(["lmu-jax", "sweep", "plan", args.spec, "--sweep-dir", args.sweep_dir, "--format", "ids"],
                      dry_run_result=Result(0, DRY_RUN_RUN_ID + "\n"))
    if not plan.ok:
        raise LaunchError(f"`lmu-jax sweep plan {args.spec}` failed (exit {plan.returncode}): "
                          f"{last_line(plan.stderr)}")
    run_ids = [check_run_id(line.strip()) for line in plan.stdout.splitlines() if line.strip()]
    if runner.dry_run:
        runner.note(f"dry run: the run ids come from the plan above; {DRY_RUN_RUN_ID} stands for each of them")
    lease_root = args.leases or f"{args.sweep_dir.rstrip('/')}/queue"
    log(f"sweep {args.spec}: {len(run_ids)} run id(s); leases under {lease_root}")

    holder = f"{socket.gethostname()}:{os.getpid()}:{tpu.name}"
    leases = Leases(open_store(lease_root, runner), holder, ttl, clock)
    babysitter = Babysitter(tpu, policy, clock)

    def sweep_run_command(run_id: str) -> list[str]:
        return ["lmu-jax", "sweep", "run", remote_spec, "--sweep-dir", args.sweep_dir, "--only", run_id,
                "--no-progress", *extra]

    def run_one(run_id: str, stop) -> None:
        babysitter.run(sweep_run_command(run_id), env, log_subdir=run_id, stop=stop)

    SweepQueue(leases, run_one, poll_s=queue_poll, on_lost=runner.terminate).run(run_ids)
    _print_recovery(runner, tpu, sweep_run_command(DRY_RUN_RUN_ID), env, policy)
    if args.delete_when_done:
        tpu.delete()
    return 0


# ---- parser -------------------------------------------------------------------------------------

def _flags(*adders):
    parent = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(parent)
    return parent


def _add_common(p):
    p.add_argument("--slice", help="accelerator type: v4-32, v5litepod-256 (or v5e-256), v5p-128, v6e-8, ...")
    p.add_argument("--name", help="queued resource and node name (default: lmu-<slice>)")
    p.add_argument("--zone", help="e.g. us-central2-b; `gcloud compute tpus accelerator-types list --zone Z` "
                                  "shows what a zone offers")
    p.add_argument("--project", help="GCP project id")
    p.add_argument("--internal-ip", action="store_true", help="ssh over internal IPs (launcher runs inside the VPC)")
    p.add_argument("--dry-run", action="store_true", help="print every command, in order, and change nothing")
    p.add_argument("--log-dir", default="logs", help="local logs: <log-dir>/<name>/worker-<i>.log (default: logs)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between state checks (default: 30)")
    p.add_argument("--create-timeout", type=float, default=7200.0,
                   help="seconds to wait for ACTIVE (or for a deletion) before counting a failure (default: 7200)")


def _add_create(p):
    kind = p.add_mutually_exclusive_group()
    for choice in PROVISIONING[1:]:
        kind.add_argument(f"--{choice}", dest="provisioning", action="store_const", const=choice,
                          help=f"gcloud's --{choice}" + (" (preemptible, cheapest)" if choice == "spot" else ""))
    p.set_defaults(provisioning="on-demand")
    p.add_argument("--runtime-version", help="override the generation's default TPU software version")
    p.add_argument("--service-account", help="service account for the TPU VMs (needs read/write on your bucket)")


def _add_install(p):
    p.add_argument("--repo", help="git URL the workers clone (public, or reachable with their credentials)")
    p.add_argument("--ref", default="main", help="branch, tag or commit to check out (default: main)")
    p.add_argument("--wheel", help="a built wheel to copy to the workers instead of cloning")
    p.add_argument("--copy", action="append", default=[], help="extra file for the workers (with --wheel)")
    p.add_argument("--python", default="3.11", help="Python for the workers' venv (default: 3.11)")
    p.add_argument("--jax-spec", default="jax[tpu]", help="jax requirement installed with the project")


def _add_env(p):
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE (or NAME: this shell's value) for the job")
    p.add_argument("--libtpu-init-args", help="LIBTPU_INIT_ARGS, e.g. XLA flags such as the latency-hiding scheduler")
    p.add_argument("--compilation-cache", help="JAX_COMPILATION_CACHE_DIR, e.g. gs://BUCKET/jax-cache")


def _add_retry(p):
    p.add_argument("--max-retries", type=int, default=5, help="retries after the first attempt (default: 5)")
    p.add_argument("--backoff", type=float, default=60.0, help="first retry delay in seconds, doubling (default: 60)")
    p.add_argument("--backoff-max", type=float, default=1800.0, help="longest retry delay (default: 1800)")


def _add_sweep(p):
    p.add_argument("--spec", required=True, help="sweep spec (YAML), planned locally with `lmu-jax sweep plan`")
    p.add_argument("--sweep-dir", required=True,
                   help="the sweep's directory, shared by every worker and launcher: gs://BUCKET/sweeps/NAME")
    p.add_argument("--leases", help="shared lease location (default: <sweep-dir>/queue); gs://... or a directory")
    p.add_argument("--lease-ttl", type=float, default=600.0,
                   help="seconds a lease lives without renewal; renewed every ttl/3 (default: 600)")
    p.add_argument("--queue-poll", type=float, default=60.0,
                   help="seconds between looks at the queue when every pending run is held elsewhere")
    p.add_argument("--delete-when-done", action="store_true", help="delete the slice when the sweep is done")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m tpu.launch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="subcommand", required=True, parser_class=ArgumentParser)
    common, create, install, env, retry, sweep = (_flags(_add_common), _flags(_add_create), _flags(_add_install),
                                                  _flags(_add_env), _flags(_add_retry), _flags(_add_sweep))
    table = {
        "slices": ([], cmd_slices, "print the slice table"),
        "create": ([common, create], cmd_create, "create a slice and wait until it is ACTIVE"),
        "status": ([common], cmd_status, "show the slice's state"),
        "install": ([common, install], cmd_install, "install the project on every worker"),
        "run": ([common, install, env], cmd_run, "run a command once on every worker"),
        "babysit": ([common, create, install, env, retry], cmd_babysit,
                    "run a command to completion, recreating the slice after preemptions"),
        "sweep": ([common, create, install, env, retry, sweep], cmd_sweep,
                  "run a sweep's runs from a shared lease queue on this slice"),
        "delete": ([common], cmd_delete, "delete the slice"),
    }
    for name, (parents, func, help_text) in table.items():
        p = sub.add_parser(name, parents=parents, help=help_text, description=help_text)
        if name in ("run", "babysit", "sweep"):
            what = "extra arguments for `lmu-jax sweep run`" if name == "sweep" else "the command, after --"
            p.add_argument("job", nargs=argparse.REMAINDER, help=what)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None, *, runner=None, clock: Clock | None = None) -> int:
    """Entry point; tests pass a scripted ``runner`` and a fake ``clock``."""
    try:
        args = build_parser().parse_args(argv)
        if runner is None:
            runner = DryRunner() if getattr(args, "dry_run", False) else SubprocessRunner()
        return args.func(args, runner, clock or Clock())
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted: the slice is left as it is (python -m tpu.launch status/delete ...)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""gcloud command lines and the shell scripts run on the TPU VMs, as pure functions of the settings.

Nothing here runs anything; ``babysit.py`` hands these argv lists to the runner. Flags follow the
``gcloud compute tpus`` reference (GA track): queued resources take ``--spot``, ``--reserved`` or
``--guaranteed`` (``--best-effort`` exists only in ``gcloud alpha``, so it is not offered).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from tpu.slices import SliceSpec

PROVISIONING = ("on-demand", "spot", "reserved", "guaranteed")  # on-demand = no flag

# Where things live on every TPU VM ($HOME of the ssh user).
REMOTE_CHECKOUT = "$HOME/lmu_jax"  # git clone of the repository (the working directory of jobs)
REMOTE_FILES_DIRNAME = "lmu_jax_files"  # wheel + copied configs (the working directory in wheel mode)
REMOTE_FILES = f"$HOME/{REMOTE_FILES_DIRNAME}"
EXTRAS = "tfds,gcs"  # the project's extras on the workers: TFDS corpora, gs:// paths through gcsfs
REMOTE_VENV = "$HOME/lmu_jax_venv"
REMOTE_STATE = "$HOME/lmu_jax_logs"  # job.log (full log of every attempt) and job.pid
EXIT_MARKER = "lmu-tpu-exit="  # each worker's last line: "[worker-<i>] lmu-tpu-exit=<code>[ signal=TERM]"
WORKER_NUMBER_URL = ("http://metadata.google.internal/computeMetadata/v1/instance/attributes/"
                     "agent-worker-number")
UV_INSTALLER = "https://astral.sh/uv/install.sh"


@dataclass(frozen=True)
class SliceTarget:
    """Which slice: the queued resource and its node share one name."""

    name: str
    zone: str
    project: str
    spec: SliceSpec
    internal_ip: bool = False  # ssh over the VPC when the launcher itself runs on GCP

    @property
    def location(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]


@dataclass(frozen=True)
class CreateOptions:
    provisioning: str = "on-demand"
    runtime_version: Optional[str] = None  # default: the generation's version from slices.py
    service_account: Optional[str] = None


@dataclass(frozen=True)
class InstallSource:
    """Either a git repository at a ref, or a wheel (plus files the job reads, e.g. configs)."""

    repo: Optional[str] = None
    ref: str = "main"
    wheel: Optional[str] = None
    copies: tuple[str, ...] = ()
    python: str = "3.11"  # jax 0.10 needs >= 3.11; TPU images ship Ubuntu 22.04's 3.10, so uv brings one
    jax_spec: str = "jax[tpu]"  # resolved together with the project's own jax pin

    @property
    def workdir(self) -> str:
        return REMOTE_CHECKOUT if self.wheel is None else REMOTE_FILES


@dataclass(frozen=True)
class JobEnv:
    """Environment exported on every worker before the job starts."""

    variables: dict = field(default_factory=dict)


# ---- queued resources and nodes -------------------------------------------------------------------

def qr_create(target: SliceTarget, options: CreateOptions) -> list[str]:
    argv = ["gcloud", "compute", "tpus", "queued-resources", "create", target.name,
            f"--node-id={target.name}",
            f"--accelerator-type={target.spec.accelerator_type}",
            f"--runtime-version={options.runtime_version or target.spec.runtime_version}",
            *target.location]
    if options.provisioning != "on-demand":
        argv.append(f"--{options.provisioning}")
    if options.service_account:
        # Access is then governed by the account's IAM roles, which is what Google recommends.
        argv += [f"--service-account={options.service_account}",
                 "--scopes=https://www.googleapis.com/auth/cloud-platform"]
    argv.append("--async")  # return at once; we poll `describe` ourselves, with our own timeout
    return argv


def qr_describe(target: SliceTarget) -> list[str]:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", target.name, *target.location,
            "--format=value(state.state)"]


def qr_delete(target: SliceTarget) -> list[str]:
    # --force also deletes the node the queued resource created; --quiet skips the confirmation.
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", target.name, *target.location,
            "--force", "--quiet"]


def node_describe(target: SliceTarget) -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "describe", target.name, *target.location,
            "--format=value(state,health)"]


def ssh_all(target: SliceTarget, script: str) -> list[str]:
    """Run ``script`` (one line of bash) on every worker at once."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", target.name, *target.location, "--worker=all"]
    if target.internal_ip:
        argv.append("--internal-ip")
    # A recreated slice has new host keys under the same name: a prompt would hang an unattended launcher.
    argv += ["--strict-host-key-checking=no", "--quiet", "--command", script]
    return argv


def scp_files(target: SliceTarget, local_paths: list[str]) -> list[str]:
    """Copy files into ~/lmu_jax_files/ on every worker (a relative path: scp resolves it in $HOME)."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", *local_paths, f"{target.name}:{REMOTE_FILES_DIRNAME}/",
            *target.location, "--worker=all"]
    if target.internal_ip:
        argv.append("--internal-ip")
    return argv + ["--strict-host-key-checking=no", "--quiet"]


# ---- scripts run on the workers ----------------------------------------------------------------------

def _quote(value: str) -> str:
    """Shell-quote for bash, preferring double quotes so the script stays readable inside ssh's quoting."""
    return f'"{value}"' if re.fullmatch(r'[^"$`\\!]*', value) else shlex.quote(value)


def _uv_venv(source: InstallSource) -> list[str]:
    return [
        'export PATH="$HOME/.local/bin:$PATH"',
        f"command -v uv >/dev/null || curl -LsSf {UV_INSTALLER} | sh",
        f'uv venv --quiet --allow-existing --python {_quote(source.python)} "{REMOTE_VENV}"',
    ]


def wheel_requirement(wheel_path: str) -> str:
    """``"lmu_jax[tfds,gcs] @ file://$HOME/lmu_jax_files/<wheel>"`` (double quotes: $HOME expands remotely).

    Wheel file names are ``<dist>-<version>(-<build>)?-<python>-<abi>-<platform>.whl`` with only
    [A-Za-z0-9_.+-] characters, so they need no further quoting.
    """
    wheel = Path(wheel_path).name
    return f'"{wheel.split("-")[0]}[{EXTRAS}] @ file://{REMOTE_FILES}/{wheel}"'


def install_script(source: InstallSource) -> str:
    """Bring every worker to the requested code, in a venv with the project and jax[tpu]. Idempotent."""
    steps = ["set -e"]
    if source.wheel is None:
        steps += [
            f'if [ ! -d "{REMOTE_CHECKOUT}/.git" ]; then git clone --quiet {_quote(source.repo)} '
            f'"{REMOTE_CHECKOUT}"; fi',
            f'cd "{REMOTE_CHECKOUT}"',
            # fetch + FETCH_HEAD works the same for a branch, a tag or a commit id
            f"git fetch --quiet origin {_quote(source.ref)}",
            "git checkout --quiet --force FETCH_HEAD",
            *_uv_venv(source),
            f'uv pip install --quiet --python "{REMOTE_VENV}/bin/python" -e ".[{EXTRAS}]" {_quote(source.jax_spec)}',
        ]
    else:
        steps += [
            *_uv_venv(source),
            f'uv pip install --quiet --python "{REMOTE_VENV}/bin/python" {wheel_requirement(source.wheel)} '
            f"{_quote(source.jax_spec)}",
        ]
    return "; ".join(steps)


def job_script(command: list[str], source: InstallSource, env: JobEnv) -> str:
    """Run ``command`` on one worker: stop a leftover job, export env, prefix output, report the exit code.

    Output goes to $HOME/lmu_jax_logs/job.log on the VM and, prefixed with ``[worker-<i>] ``, back through
    ssh, where the launcher splits it into one local file per worker. The worker index comes from the TPU
    VM metadata server and is exported as ``LMU_JAX_WORKER_ID``. The last line is the exit marker: the launcher decides success from the markers of
    all workers, not from gcloud's own exit status. A preempted VM sends SIGTERM to everything; the trainer
    then saves a checkpoint and exits 0, so the marker also says whether this shell got SIGTERM: such an
    exit is a preemption, not a finished job.
    """
    state = REMOTE_STATE
    # LMU_JAX_WORKER_ID: which process of the job this is, for `lmu-jax sweep run` (lmu_jax.distributed)
    exports = ['PATH="%s/bin:$PATH"' % REMOTE_VENV, "PYTHONUNBUFFERED=1", 'LMU_JAX_WORKER_ID="$W"']
    exports += [f"{key}={_quote(str(value))}" for key, value in sorted(env.variables.items())]
    return "; ".join([
        f'mkdir -p "{state}"',
        f'W=$(curl -sf -H "Metadata-Flavor: Google" {WORKER_NUMBER_URL} || echo unknown)',
        # A job from an earlier attempt may still hold the TPU (libtpu allows one process per chip).
        f'if [ -f "{state}/job.pid" ]; then kill -9 "$(cat "{state}/job.pid")" 2>/dev/null; sleep 2; fi',
        "sudo rm -f /tmp/libtpu_lockfile",
        'trap "SIG=TERM" TERM',
        "export " + " ".join(exports),
        # Inside the subshell, so a failing cd (nothing installed) still ends with an exit marker.
        f'(cd "{source.workdir}" && echo $BASHPID > "{state}/job.pid" && exec {shlex.join(command)}) 2>&1 '
        f'| tee -a "{state}/job.log" | sed -u "s/^/[worker-$W] /"',
        "rc=${PIPESTATUS[0]}",
        f'rm -f "{state}/job.pid"',
        f'echo "[worker-$W] {EXIT_MARKER}$rc${{SIG:+ signal=$SIG}}"',
        "exit $rc",
    ])


def prepare_files_script() -> str:
    return f'mkdir -p "{REMOTE_FILES}"'

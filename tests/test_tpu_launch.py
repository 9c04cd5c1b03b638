"""tpu/: slice facts, dry runs, babysitting through preemptions, the sweep lease queue, bad input.

No gcloud here: ``FakeCloud`` is a scripted runner that answers like gcloud would (queued-resource
states, preempted jobs, GCS generations) and records every command.
"""

from __future__ import annotations

import multiprocessing
import os
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tpu import gcloud
from tpu.babysit import Outcome, classify
from tpu.gcloud import InstallSource, JobEnv
from tpu.launch import main
from tpu.runner import Clock, Result
from tpu.slices import parse_slice
from tpu.sweep_queue import GcsLeaseStore, LeaseKeeper, Leases, LocalLeaseStore, MemoryLeaseStore, SweepQueue

ZONE_PROJECT = ["--zone", "us-central2-b", "--project", "my-project"]
REPO = ["--repo", "https://github.com/example/lmu_jax.git", "--ref", "v0.1.0"]
TRAIN = ["--", "lmu-jax", "train", "--config", "experiments/configs/default.yaml", "--run-dir",
         "gs://my-bucket/runs/default"]


class FakeClock(Clock):
    def __init__(self):
        self.t = 1_700_000_000.0
        self.sleeps: list[float] = []

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.t += seconds


class FakeCloud:
    """A scripted Cloud TPU + GCS. ``jobs`` says how each job launch ends:
    "ok"; "preempt" (nobody reports an exit, the queued resource is SUSPENDED, ssh exits 255);
    "node-preempt" (the same, but the queued resource still says ACTIVE while its node is PREEMPTED);
    "vanish" (nobody reports an exit, yet the slice looks healthy: ssh sessions died);
    "sigterm" (the trainer checkpoints on SIGTERM and every worker exits 0, flagged signal=TERM; SUSPENDED);
    "exit0-suspended" (every worker exits 0 without the flag, but the slice is SUSPENDED right after);
    or an int exit code reported by worker 1 (the others report 0)."""

    dry_run = False

    def __init__(self, hosts, jobs=("ok",), after_create=("WAITING_FOR_RESOURCES", "ACTIVE")):
        self.hosts, self.jobs, self.after_create = hosts, list(jobs), list(after_create)
        self.calls: list[list[str]] = []
        self.qr_states: list[str] = []  # upcoming states; the last one sticks
        self.node_state = "READY\tHEALTHY"
        self.objects: dict[str, tuple[int, str]] = {}  # GCS url -> (generation, content)
        self.generation = 0

    def terminate(self):
        pass

    def created(self):
        return [c for c in self.calls if c[3:5] == ["queued-resources", "create"]]

    def deleted(self):
        return [c for c in self.calls if c[3:5] == ["queued-resources", "delete"]]

    def job_launches(self):
        return [c for c in self.calls if "ssh" in c and "lmu-tpu-exit" in c[-1]]

    def installs(self):
        return [c for c in self.calls if "ssh" in c and c[-1].startswith("set -e")]

    def run(self, argv, *, on_line=None, input_text=None, dry_run_result=None):
        self.calls.append(list(argv))
        if argv[:2] == ["gcloud", "storage"]:
            return self._storage(argv[2:], input_text)
        if argv[3:5] == ["queued-resources", "describe"]:
            if not self.qr_states:
                return Result(1, "", "ERROR: NOT_FOUND: queued resource was not found")
            state = self.qr_states.pop(0) if len(self.qr_states) > 1 else self.qr_states[0]
            return Result(0, state + "\n")
        if argv[3:5] == ["queued-resources", "create"]:
            self.qr_states, self.node_state = list(self.after_create), "READY\tHEALTHY"
            return Result(0)
        if argv[3:5] == ["queued-resources", "delete"]:
            self.qr_states = []
            return Result(0)
        if argv[3:5] == ["tpu-vm", "describe"]:
            active = self.qr_states[:1] == ["ACTIVE"]
            return Result(0, (self.node_state if active else "PREEMPTED") + "\n")
        if argv[3:5] == ["tpu-vm", "ssh"] and "lmu-tpu-exit" in argv[-1]:
            return self._job(on_line)
        if argv[3:5] == ["tpu-vm", "ssh"]:
            on_line and on_line("Collecting jax[tpu]")
            return Result(0)
        raise AssertionError(f"unexpected command {argv}")

    def _job(self, on_line):
        behaviour = self.jobs.pop(0)
        for worker in range(self.hosts):
            on_line(f"[worker-{worker}] step 1 loss 5.5")
        if behaviour in ("preempt", "node-preempt", "vanish"):
            if behaviour == "preempt":
                self.qr_states = ["SUSPENDED"]
            if behaviour == "node-preempt":
                self.node_state = "PREEMPTED"
            on_line("ssh: connect to host 10.0.0.3 port 22: Connection refused")
            return Result(255)
        if behaviour in ("sigterm", "exit0-suspended"):
            self.qr_states = ["SUSPENDED"]
            flag = " signal=TERM" if behaviour == "sigterm" else ""
            for worker in range(self.hosts):
                on_line(f"[worker-{worker}] lmu-tpu-exit=0{flag}")
            return Result(0)
        code = 0 if behaviour == "ok" else behaviour
        for worker in range(self.hosts):
            on_line(f"[worker-{worker}] lmu-tpu-exit={code if worker == 1 else 0}")
        return Result(0 if code == 0 else 1)

    def _storage(self, args, input_text):
        if args[:2] == ["objects", "describe"]:
            if args[2] not in self.objects:
                return Result(1, "", f"ERROR: {args[2]} not found: 404.")
            return Result(0, f"{self.objects[args[2]][0]}\n")
        if args[0] == "cat":
            url, generation = args[1].split("#")
            if url not in self.objects or self.objects[url][0] != int(generation):
                return Result(1, "", "ERROR: 404 No such object")
            return Result(0, self.objects[url][1])
        if args[0] == "cp":
            url, expected = args[2], int(args[3].split("=")[1])
            if self.objects.get(url, (0, ""))[0] != expected:
                return Result(1, "", "ERROR: HTTPError 412: At least one of the pre-conditions you specified did not hold.")
            self.generation += 1
            self.objects[url] = (self.generation, input_text)
            return Result(0)
        if args[0] == "ls":
            found = sorted(url for url in self.objects if url.startswith(args[1]))
            return Result(0, "".join(u + "\n" for u in found)) if found else \
                Result(1, "", "ERROR: One or more URLs matched no objects.")
        raise AssertionError(f"unexpected storage command {args}")


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs/ and lease directories land here
    return tmp_path


# ---- slice facts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, accelerator, chips, hosts, per_host, runtime", [
    ("v4-8", "v4-8", 4, 1, 4, "tpu-ubuntu2204-base"),
    ("v4-32", "v4-32", 16, 4, 4, "tpu-ubuntu2204-base"),  # v4 counts TensorCores: 2 per chip, 4 chips a host
    ("v5litepod-8", "v5litepod-8", 8, 1, 8, "v2-alpha-tpuv5-lite"),  # one 8-chip VM
    ("v5litepod-16", "v5litepod-16", 16, 4, 4, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", "v5litepod-256", 256, 64, 4, "v2-alpha-tpuv5-lite"),  # v5e counts chips; 4-chip VMs
    ("v5e-256", "v5litepod-256", 256, 64, 4, "v2-alpha-tpuv5-lite"),  # the common alias
    ("v5p-8", "v5p-8", 4, 1, 4, "v2-alpha-tpuv5"),
    ("v5p-128", "v5p-128", 64, 16, 4, "v2-alpha-tpuv5"),
    ("v6e-8", "v6e-8", 8, 1, 8, "v2-alpha-tpuv6e"),
    ("v6e-256", "v6e-256", 256, 64, 4, "v2-alpha-tpuv6e"),
])
def test_slice_table(name, accelerator, chips, hosts, per_host, runtime):
    spec = parse_slice(name)
    assert (spec.accelerator_type, spec.chips, spec.hosts, spec.devices_per_host, spec.runtime_version) == \
        (accelerator, chips, hosts, per_host, runtime)
    assert spec.devices == chips  # one JAX device per chip on all four generations


# ---- dry runs ------------------------------------------------------------------------------------

def dry_run(capsys, argv):
    code = main(argv[:1] + ["--dry-run"] + argv[1:])  # before the job's "--"
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_dry_run_v4_32_babysit(capsys, in_tmp_dir):
    code, lines, _ = dry_run(capsys, ["babysit", "--slice", "v4-32", *ZONE_PROJECT, "--spot", *REPO,
                                      "--compilation-cache", "gs://my-bucket/jax-cache", "--max-retries", "3", *TRAIN])
    assert code == 0
    commands_run = [line for line in lines if not line.startswith("#")]
    assert lines[0] == "# v4-32: 16 chips, 4 hosts x 4 devices, runtime tpu-ubuntu2204-base"
    location = "--zone=us-central2-b --project=my-project"
    assert commands_run[0] == f"gcloud compute tpus queued-resources describe lmu-v4-32 {location} " \
                              "'--format=value(state.state)'"
    assert commands_run[1] == ("gcloud compute tpus queued-resources create lmu-v4-32 --node-id=lmu-v4-32 "
                               f"--accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base {location} "
                               "--spot --async")
    assert commands_run[2] == commands_run[0]  # the wait for ACTIVE
    install, job = commands_run[3], commands_run[4]
    ssh = f"gcloud compute tpus tpu-vm ssh lmu-v4-32 {location} --worker=all"
    assert install.startswith(ssh) and job.startswith(ssh)
    assert 'git fetch --quiet origin "v0.1.0"' in install and '-e ".[tfds,gcs]" "jax[tpu]"' in install
    assert "--python \"3.11\"" in install
    assert 'JAX_COMPILATION_CACHE_DIR="gs://my-bucket/jax-cache"' in job
    assert ("exec lmu-jax train --config experiments/configs/default.yaml --run-dir gs://my-bucket/runs/default"
            in job)
    assert 'LMU_JAX_WORKER_ID="$W"' in job  # the sweep runner's process index
    health = ["queued-resources describe lmu-v4-32", "tpu-vm describe lmu-v4-32"]  # still there after exit 0?
    assert len(commands_run) == 7 and all(h in c for h, c in zip(health, commands_run[5:]))
    recovery = [line for line in lines if line.startswith("#   ")]
    assert any(line.startswith("# after a preemption") and "up to 3 times" in line for line in lines)
    assert any("queued-resources delete lmu-v4-32" in line and "--force --quiet" in line for line in recovery)
    assert [("create" in l, "ssh" in l) for l in recovery][-3:] == [(False, False), (False, True), (False, True)]
    assert not (in_tmp_dir / "logs").exists()  # a dry run changes nothing


def test_readme_dry_run_example_is_current(capsys):
    readme = (Path(__file__).resolve().parents[1] / "tpu" / "README.md").read_text()
    block = readme.split("prints (stdout; progress lines go to stderr):\n\n```\n", 1)[1].split("```", 1)[0]
    shown = [line for line in block.splitlines() if not line.startswith("#   ")]  # the recovery part is abridged
    argv = shlex.split(readme.split("```bash\npython -m tpu.launch babysit --dry-run ", 1)[1]
                       .split("```", 1)[0].replace("\\\n", " "))
    _, lines, _ = dry_run(capsys, ["babysit", *argv])
    assert shown == [line for line in lines if not line.startswith("#   ")]


def test_dry_run_v5litepod_256_create_and_run(capsys):
    code, lines, _ = dry_run(capsys, ["create", "--slice", "v5litepod-256", "--zone", "us-west4-a",
                                      "--project", "p", "--reserved", "--service-account", "tpu@p.iam.gserviceaccount.com"])
    assert code == 0
    assert lines[0] == "# v5litepod-256: 256 chips, 64 hosts x 4 devices, runtime v2-alpha-tpuv5-lite"
    assert lines[2] == ("gcloud compute tpus queued-resources create lmu-v5litepod-256 --node-id=lmu-v5litepod-256 "
                        "--accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --zone=us-west4-a "
                        "--project=p --reserved --service-account=tpu@p.iam.gserviceaccount.com "
                        "--scopes=https://www.googleapis.com/auth/cloud-platform --async")

    code, lines, err = dry_run(capsys, ["run", "--slice", "v5e-256", "--name", "big", "--zone", "us-west4-a",
                                        "--project", "p",
                                        "--libtpu-init-args=--xla_tpu_enable_latency_hiding_scheduler=true", *TRAIN])
    assert code == 0
    assert len(lines) == 3 and lines[2].startswith("gcloud compute tpus tpu-vm ssh big ")
    assert "LIBTPU_INIT_ARGS=\"--xla_tpu_enable_latency_hiding_scheduler=true\"" in lines[2]
    assert "all 64 workers exited 0" in err


def test_dry_run_wheel_install(capsys, in_tmp_dir):
    (in_tmp_dir / "dist").mkdir()
    (in_tmp_dir / "dist" / "lmu_jax-0.1.0-py3-none-any.whl").write_bytes(b"")
    (in_tmp_dir / "small.yaml").write_text("model: {}\n")
    code, lines, _ = dry_run(capsys, ["install", "--slice", "v6e-16", *ZONE_PROJECT,
                                      "--wheel", "dist/lmu_jax-0.1.0-py3-none-any.whl", "--copy", "small.yaml"])
    assert code == 0 and lines[0] == "# v6e-16: 16 chips, 4 hosts x 4 devices, runtime v2-alpha-tpuv6e"
    assert lines[1].endswith("--worker=all --strict-host-key-checking=no --quiet --command 'mkdir -p \"$HOME/lmu_jax_files\"'")
    assert lines[2] == ("gcloud compute tpus tpu-vm scp dist/lmu_jax-0.1.0-py3-none-any.whl small.yaml "
                        "lmu-v6e-16:lmu_jax_files/ --zone=us-central2-b --project=my-project --worker=all "
                        "--strict-host-key-checking=no --quiet")
    assert '"lmu_jax[tfds,gcs] @ file://$HOME/lmu_jax_files/lmu_jax-0.1.0-py3-none-any.whl" "jax[tpu]"' in lines[3]
    script = lines[3].split("--command ", 1)[1]
    assert subprocess.run(["bash", "-n", "-c", shlex.split(script)[0]]).returncode == 0


def test_dry_run_sweep_on_gcs_leases(capsys, in_tmp_dir):
    (in_tmp_dir / "sweep.yaml").write_text("name: tiny\n")
    code, lines, _ = dry_run(capsys, ["sweep", "--slice", "v4-32", *ZONE_PROJECT, *REPO, "--spec", "sweep.yaml",
                                      "--sweep-dir", "gs://my-bucket/sweeps/tiny"])
    assert code == 0
    text = "\n".join(lines)
    assert "\nlmu-jax sweep plan sweep.yaml --sweep-dir gs://my-bucket/sweeps/tiny --format ids\n" in text
    lease = "gs://my-bucket/sweeps/tiny/queue/leases/RUN_ID.json"
    assert f"gcloud storage cp - {lease} --if-generation-match=0" in text  # take the free lease
    assert ("exec lmu-jax sweep run sweep.yaml --sweep-dir gs://my-bucket/sweeps/tiny --only RUN_ID --no-progress)"
            in text)
    done = text.index("gcloud storage cp - gs://my-bucket/sweeps/tiny/queue/done/RUN_ID.json --if-generation-match=0")
    release = text.index(f"gcloud storage cp - {lease} --if-generation-match=1")
    assert text.index("--only RUN_ID") < done < release  # done is written before the lease is released


# ---- babysitting ---------------------------------------------------------------------------------

def babysit(cloud, clock, *extra):
    return main(["babysit", "--slice", "v4-32", *ZONE_PROJECT, "--spot", *REPO, "--backoff", "60", *extra, *TRAIN],
                runner=cloud, clock=clock)


def test_babysitter_recreates_a_preempted_slice_and_relaunches(in_tmp_dir, capsys):
    cloud, clock = FakeCloud(hosts=4, jobs=["preempt", "ok"]), FakeClock()
    assert babysit(cloud, clock) == 0
    assert len(cloud.created()) == 2 and len(cloud.deleted()) == 1
    assert len(cloud.installs()) == 2  # the new VMs are installed again
    assert cloud.job_launches()[0] == cloud.job_launches()[1]  # the very same command, relaunched
    order = [" ".join(c[3:5]) for c in cloud.calls]
    first_job, delete = order.index("tpu-vm ssh", 4), order.index("queued-resources delete")
    assert first_job < delete < order.index("queued-resources create", delete)
    assert 60 in clock.sleeps and 30 in clock.sleeps  # one backoff, polls while WAITING_FOR_RESOURCES
    err = capsys.readouterr().err
    assert "4 workers never reported an exit code" in err and "recreating the slice in 60 s" in err
    worker0 = (in_tmp_dir / "logs" / "lmu-v4-32" / "worker-0.log").read_text()
    assert worker0.count("===== attempt") == 2 and worker0.count("step 1 loss 5.5") == 2
    assert "Connection refused" in (in_tmp_dir / "logs" / "lmu-v4-32" / "launcher.log").read_text()
    assert sorted(p.name for p in (in_tmp_dir / "logs" / "lmu-v4-32").iterdir()) == \
        ["install.log", "launcher.log", "worker-0.log", "worker-1.log", "worker-2.log", "worker-3.log"]


def test_babysitter_gives_up_after_max_retries(capsys):
    cloud, clock = FakeCloud(hosts=4, jobs=["preempt"] * 3), FakeClock()
    assert babysit(cloud, clock, "--max-retries", "2") == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith(
        "error: giving up on lmu-v4-32 after 3 failed attempts (--max-retries=2); last failure: ")
    assert len(cloud.created()) == 3 and len(cloud.job_launches()) == 3
    assert [s for s in clock.sleeps if s != 30] == [60, 120]  # exponential backoff between attempts


@pytest.mark.parametrize("preemption, message", [
    ("sigterm", "got SIGTERM (the VM was preempted or shut down)"),
    ("exit0-suspended", "all 4 workers exited 0, but the queued resource is SUSPENDED right after"),
])
def test_exit_0_from_a_preempted_slice_is_not_success(capsys, preemption, message):
    """The trainer answers SIGTERM with a checkpoint and exit code 0; the launcher must not stop there."""
    cloud, clock = FakeCloud(hosts=4, jobs=[preemption, "ok"]), FakeClock()
    assert babysit(cloud, clock) == 0
    assert len(cloud.job_launches()) == 2 and len(cloud.created()) == 2
    assert message in capsys.readouterr().err


def test_preempted_node_under_an_active_queued_resource_is_recreated(capsys):
    cloud, clock = FakeCloud(hosts=4, jobs=["node-preempt", "ok"]), FakeClock()
    assert babysit(cloud, clock) == 0
    assert len(cloud.created()) == 2 and len(cloud.deleted()) == 1
    assert "the node is PREEMPTED" in capsys.readouterr().err


def test_workers_lost_twice_on_a_healthy_slice_recreate_it():
    cloud, clock = FakeCloud(hosts=4, jobs=["vanish", "vanish", "ok"]), FakeClock()
    assert babysit(cloud, clock) == 0
    order = [" ".join(c[3:5]) for c in cloud.calls]
    launches = [i for i, c in enumerate(cloud.calls) if c in cloud.job_launches()]
    assert "queued-resources delete" not in order[launches[0]:launches[1]]  # first time: relaunch as is
    assert "queued-resources delete" in order[launches[1]:launches[2]]  # second time: recreate
    assert len(cloud.job_launches()) == 3


def test_failed_job_on_healthy_slice_is_relaunched_without_recreating():
    cloud, clock = FakeCloud(hosts=4, jobs=[1, "ok"]), FakeClock()
    assert babysit(cloud, clock) == 0
    assert len(cloud.created()) == 1 and not cloud.deleted() and len(cloud.installs()) == 1
    assert len(cloud.job_launches()) == 2


def test_job_exit_code_2_is_not_retried(capsys):
    cloud, clock = FakeCloud(hosts=4, jobs=[2, "ok"]), FakeClock()
    assert babysit(cloud, clock) == 1
    assert len(cloud.job_launches()) == 1
    assert "not retrying on lmu-v4-32: the job exited with code 2" in capsys.readouterr().err


def test_outcome_needs_an_exit_marker_from_every_worker():
    assert classify({"0": 0, "1": 0, "2": 0, "3": 0}, 4).outcome is Outcome.SUCCEEDED
    assert classify({"0": 0, "1": 0, "3": 0}, 4).outcome is Outcome.WORKERS_LOST
    assert classify({"0": 0, "1": 137}, 4).outcome is Outcome.FAILED
    assert classify({"0": 2, "1": 137}, 4).outcome is Outcome.REJECTED
    assert classify({"0": 0, "1": 0, "2": 0, "3": 0}, 4, signalled={"2"}).outcome is Outcome.WORKERS_LOST


def test_job_script_runs_in_bash(tmp_path):
    """The worker-side script: prefixes output, keeps a log on the VM, reports and returns the exit code."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "curl").write_text("#!/bin/sh\necho 3\n")  # the metadata server: this is worker 3
    (fake_bin / "sudo").write_text("#!/bin/sh\nexit 0\n")
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    (tmp_path / "lmu_jax").mkdir()
    script = gcloud.job_script(["python3", "-c", "import os, sys; print('loss', os.environ['FOO']); sys.exit(3)"],
                                 InstallSource(repo="r"), JobEnv({"FOO": "a b"}))
    env = {"HOME": str(tmp_path), "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 3
    assert done.stdout.splitlines() == ["[worker-3] loss a b", "[worker-3] lmu-tpu-exit=3"]
    assert (tmp_path / "lmu_jax_logs" / "job.log").read_text() == "loss a b\n"
    assert not (tmp_path / "lmu_jax_logs" / "job.pid").exists()

    # SIGTERM to the worker's shell (a preemption shutting the VM down) is reported with the exit code.
    done = subprocess.run(["bash", "-c", gcloud.job_script(["sh", "-c", "kill -TERM $PPID; exit 0"],
                                                             InstallSource(repo="r"), JobEnv())],
                          env=env, capture_output=True, text=True, timeout=20)
    assert done.stdout.splitlines() == ["[worker-3] lmu-tpu-exit=0 signal=TERM"]

    # A job left over from an earlier attempt is stopped first (it would hold the TPU).
    leftover = subprocess.Popen(["sleep", "60"])
    (tmp_path / "lmu_jax_logs" / "job.pid").write_text(f"{leftover.pid}\n")
    done = subprocess.run(["bash", "-c", gcloud.job_script(["true"], InstallSource(repo="r"), JobEnv())],
                          env=env, capture_output=True, text=True, timeout=20)
    assert leftover.wait(timeout=5) == -9 and done.stdout.splitlines() == ["[worker-3] lmu-tpu-exit=0"]

    # Nothing installed (no working directory): still one exit marker per worker, and a failure.
    done = subprocess.run(["bash", "-c", gcloud.job_script(["true"], InstallSource(wheel="x.whl"), JobEnv())],
                          env=env, capture_output=True, text=True, timeout=20)
    assert done.returncode == 1 and done.stdout.splitlines()[-1] == "[worker-3] lmu-tpu-exit=1"
    assert "lmu_jax_files" in done.stdout
    install = gcloud.install_script(InstallSource(repo="https://x/y.git", ref="main"))
    assert subprocess.run(["bash", "-n", "-c", install]).returncode == 0  # valid bash


# ---- the sweep queue -----------------------------------------------------------------------------

RUN_IDS = [f"run-{i}" for i in range(8)]


def exclusive_run(root: Path, who: str):
    """A fake sweep run that notices any concurrent run of the same id (O_EXCL on a 'running' file)."""
    def run_one(run_id, stop):
        (root / "running").mkdir(exist_ok=True)
        try:
            fd = os.open(root / "running" / run_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with open(root / "violations", "a") as f:
                f.write(f"{run_id} {who}\n")
            return
        time.sleep(0.02)
        os.close(fd)
        os.unlink(root / "running" / run_id)
        with open(root / "executed", "a") as f:
            f.write(f"{run_id} {who}\n")
    return run_one


class SlowReadStore(LocalLeaseStore):
    """Widens the gap between reading a lease and writing it, so launchers really race for each run."""

    def read(self, run_id):
        version_and_record = super().read(run_id)
        time.sleep(0.005)
        return version_and_record


def launcher(root: Path, who: str, start_together, ttl: float = 5.0):
    leases = Leases(SlowReadStore(root / "leases"), who, ttl, say=lambda _: None)
    start_together.wait()
    return SweepQueue(leases, exclusive_run(root, who), poll_s=0.01, renew_s=ttl / 3).run(RUN_IDS)


def check_each_run_once(root: Path):
    assert not (root / "violations").exists()
    executed = [line.split()[0] for line in (root / "executed").read_text().splitlines()]
    assert sorted(executed) == sorted(RUN_IDS)
    assert sorted(p.stem for p in (root / "leases" / "done").iterdir()) == sorted(RUN_IDS)
    holders = {line.split()[1] for line in (root / "executed").read_text().splitlines()}
    assert holders == {"slice-a", "slice-b"}  # both launchers took part


def test_two_launcher_threads_share_the_queue(tmp_path):
    finished, start_together = {}, threading.Barrier(2)
    threads = [threading.Thread(target=lambda w=w: finished.setdefault(w, launcher(tmp_path, w, start_together)))
               for w in ("slice-a", "slice-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    check_each_run_once(tmp_path)
    assert sorted(finished["slice-a"] + finished["slice-b"]) == sorted(RUN_IDS)


def test_two_launcher_processes_share_the_queue(tmp_path):
    context = multiprocessing.get_context("spawn")  # fork is unsafe once JAX (other tests) started threads
    start_together = context.Barrier(2)
    procs = [context.Process(target=launcher, args=(tmp_path, w, start_together)) for w in ("slice-a", "slice-b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=20)
    assert [p.exitcode for p in procs] == [0, 0]
    check_each_run_once(tmp_path)


def test_expired_lease_is_taken_over_and_a_live_one_is_not(tmp_path):
    store = LocalLeaseStore(tmp_path / "leases")
    now = time.time()
    store.write_if("run-0", 0, {"state": "held", "holder": "dead", "expires_at": now - 1, "nonce": "x"})
    store.write_if("run-1", 0, {"state": "held", "holder": "alive", "expires_at": now + 60, "nonce": "y"})

    def alive_finishes_run_1():  # the live holder finishes its run a little later
        time.sleep(0.2)
        store.mark_done("run-1", {"holder": "alive"})
        store.write_if("run-1", 1, {"state": "released", "holder": "alive", "expires_at": now, "nonce": "z"})

    threading.Thread(target=alive_finishes_run_1).start()
    messages = []
    leases = Leases(store, "me", 5.0, say=messages.append)
    finished = SweepQueue(leases, exclusive_run(tmp_path, "me"), poll_s=0.02).run(["run-0", "run-1", "run-2"])
    assert finished == ["run-0", "run-2"]  # run-1 was never run here
    assert any("held by dead expired" in m and "taking it over" in m for m in messages)
    assert any("all held by other launchers" in m for m in messages)
    assert store.done_ids() == {"run-0", "run-1", "run-2"}


def test_lost_lease_stops_the_run(tmp_path):
    store, lost = MemoryLeaseStore(), threading.Event()
    mine = Leases(store, "me", 5.0, say=lambda _: None)
    lease = mine.try_acquire("run-0")
    assert lease is not None and mine.try_acquire("run-0") is None  # held: not acquired twice
    with LeaseKeeper(mine, lease, 0.01, on_lost=lost.set):
        version, record = store.read("run-0")  # an operator (or a clock gone wrong) hands it to someone else
        store.write_if("run-0", version, {**record, "holder": "other"})
        assert lost.wait(5)


def test_local_store_rejects_a_stale_writer_after_pruning(tmp_path):
    store = LocalLeaseStore(tmp_path)
    for version in range(5):
        assert store.write_if("r", version, {"n": version + 1}) == version + 1
    assert sorted(int(p.stem) for p in (tmp_path / "leases" / "r").glob("*.json")) == [4, 5]  # pruned
    assert store.write_if("r", 1, {"n": "stale"}) is None  # re-creates pruned generation 2, but 5 is newer
    assert store.write_if("r", 4, {"n": "stale"}) is None  # generation 5 exists
    assert store.read("r") == (5, {"n": 5})


def test_gcs_lease_store_uses_generation_preconditions():
    cloud, clock = FakeCloud(hosts=1), FakeClock()
    store = GcsLeaseStore("gs://b/sweeps/s", cloud)
    a, b = Leases(store, "a", 600, clock, say=lambda _: None), Leases(store, "b", 600, clock, say=lambda _: None)
    lease = a.try_acquire("run-0")
    assert lease is not None and b.try_acquire("run-0") is None
    assert ["gcloud", "storage", "cp", "-", "gs://b/sweeps/s/leases/run-0.json", "--if-generation-match=0"] \
        in cloud.calls
    assert a.renew(lease) and lease.version == 2
    clock.t += 601  # a stops renewing (dies): b takes over, and a's next renewal fails on the precondition
    taken = b.try_acquire("run-0")
    assert taken is not None and not a.renew(lease)
    assert store.mark_done("run-0", {}) and not store.mark_done("run-0", {})
    assert store.done_ids() == {"run-0"}


# ---- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["create", "--slice", "v7-8", *ZONE_PROJECT], "slice='v7-8' is invalid: unknown TPU generation"),
    (["create", "--slice", "v4-30", *ZONE_PROJECT], "v4 sizes count TensorCores: multiples of 8"),
    (["create", "--slice", "v5litepod-12", *ZONE_PROJECT], "v5e sizes count chips"),
    (["create", "--zone", "z", "--project", "p"], "--slice is required"),
    (["create", "--slice", "v4-8", "--zone", "z"], "--project is required"),
    (["create", "--slice", "v4-8", "--project", "p"], "--zone is required"),
    (["create", "--slice", "v4-8", *ZONE_PROJECT, "--name", "Bad_Name"], "--name='Bad_Name' is invalid"),
    (["create", "--slice", "v4-8", *ZONE_PROJECT, "--spot", "--reserved"], "not allowed with argument"),
    (["babysit", "--slice", "v4-8", *ZONE_PROJECT, *REPO, "--max-retries", "0", *TRAIN],
     "--max-retries=0 is invalid: must be at least 1"),
    (["babysit", "--slice", "v4-8", *ZONE_PROJECT, *REPO], "give the command to run after --"),
    (["babysit", "--slice", "v4-8", *ZONE_PROJECT, *TRAIN], "--repo URL (with --ref) or --wheel PATH is required"),
    (["run", "--slice", "v4-8", *ZONE_PROJECT, "--env", "1X=2", *TRAIN], "--env='1X=2' is invalid"),
    (["sweep", "--slice", "v4-8", *ZONE_PROJECT, *REPO, "--spec", "missing.yaml", "--sweep-dir", "gs://b/s"],
     "--spec='missing.yaml' is invalid"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    cloud = FakeCloud(hosts=1)
    assert main(argv, runner=cloud, clock=FakeClock()) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert cloud.calls == [] and out == ""  # nothing was run

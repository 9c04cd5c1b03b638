"""Concurrency: one launch per run directory (an flock the kernel drops with its holder, so there are
no stale locks), and a sweep runner killed and restarted neither loses nor duplicates runs. (A second
launch refused by a real running trainer: test_faults_kill.py.)"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from helpers import tiny_config, write_config
from lmu_jax.cli import main
from lmu_jax.config import config_from_dict
from lmu_jax.errors import UserError
from lmu_jax.sweep.runner import STATUS_FILE
from lmu_jax.train import rundir
from lmu_jax.train.rundir import RunDir
from reliability_helpers import Launch, assert_each_step_once, checkpoint_steps, last_logged_step


@pytest.fixture
def cfg(kjv_cache):
    return config_from_dict(tiny_config(kjv_cache))


def wait_until_gone(pid: int, timeout: float = 300) -> None:
    """Until the process has ended and been reaped (the runner takes a zombie for a live trainer)."""
    deadline = time.monotonic() + timeout
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), f"process {pid} is still there"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_held_lock_refuses_a_second_launch_and_changes_nothing(cfg, tmp_path, capsys, kjv_cache):
    run = tmp_path / "run"
    holder = RunDir(run)
    holder.open(cfg)  # another open file: flock conflicts even within one process
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    config = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache))
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"is in use by pid {os.getpid()} on {socket.gethostname()}" in err, err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    holder.release_lock()
    assert not (run / ".lock").exists()
    second = RunDir(run)
    assert second.open(cfg) is False  # free again; and the directory existed
    second.release_lock()


@pytest.mark.parametrize("content", [
    lambda: json.dumps({"pid": dead_pid(), "host": socket.gethostname()}),  # SIGKILLed holder
    lambda: json.dumps({"pid": 1, "host": "old-container-3f2a"}),  # a previous container, other hostname
    lambda: json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),  # a recycled pid: ours
    lambda: "",  # killed between creating and writing the file
    lambda: "{not json",
], ids=["dead pid", "other host", "recycled pid", "empty", "garbage"])
def test_a_lock_file_nobody_holds_is_taken_over(content, cfg, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(content())
    holder = RunDir(run)
    holder.open(cfg)
    assert json.loads((run / ".lock").read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(UserError, match="is in use by pid"):
        RunDir(run).acquire_lock()
    holder.release_lock()


def test_without_flock_a_pid_file_with_stale_recovery_is_used(cfg, tmp_path, monkeypatch):
    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    first = RunDir(run)
    first.open(cfg)  # the dead holder's file is taken over
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()}"):
        RunDir(run).acquire_lock()
    first.release_lock()
    assert not (run / ".lock").exists()


SPEC = {"name": "killed", "families": ["transformer"], "sizes": [5000, 10000], "budgets": {"tokens": [7680]},
        "base": {"data": {"seq_len": 32, "max_bytes": 300_000, "val_windows": 16},
                 "train": {"batch_size": 8}, "checkpoint": {"every": 4, "keep": 2}}}


@pytest.mark.slow
def test_a_killed_sweep_runner_neither_loses_nor_duplicates_runs(tmp_path, kjv_cache, run_env):
    from lmu_jax.sweep.runner import SweepDir
    from lmu_jax.sweep.spec import expand, parse_spec

    spec_raw = json.loads(json.dumps(SPEC))
    spec_raw["base"]["data"].update(corpus="kjv", cache_dir=str(kjv_cache))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_raw))
    runs = expand(parse_spec(spec_raw))
    first, second = (tmp_path / "sweep" / "runs" / r.run_id for r in runs)
    steps = runs[0].steps
    args, logs = ["sweep", "run", str(spec), "--sweep-dir", str(tmp_path / "sweep"), "--no-progress"], tmp_path / "logs"

    # 1. the runner alone is killed; its trainer child lives on
    runner = Launch(args, run_env(devices=1), logs)
    runner.wait_until(lambda: last_logged_step(first) >= 3, "run 1 to train")
    orphan = json.loads((first / STATUS_FILE).read_text())["pid"]
    # Paused (it keeps its lock), so that the restart below meets run 1 still running however fast the
    # host trains: unpaused, it once finished its 27 remaining steps before the restarted runner looked.
    os.kill(orphan, signal.SIGSTOP)
    try:
        runner.kill()
        # 2. a restarted runner must not start run 1 again while its trainer runs; it goes on with run 2
        restarted = Launch(args, run_env(devices=1), logs)
        restarted.wait_until(lambda: checkpoint_steps(second), "run 2 to write a checkpoint")
    finally:  # never leave a stopped trainer behind, whatever failed
        os.kill(orphan, signal.SIGCONT)
    # 3. now the whole job dies: runner and trainer (the runner starts each trainer in a session of its own)
    trainer = json.loads((second / STATUS_FILE).read_text())["pid"]
    restarted.kill_group()
    os.kill(trainer, signal.SIGKILL)
    assert "already running elsewhere" in restarted.err, restarted.err
    wait_until_gone(trainer)
    wait_until_gone(orphan)  # the orphaned trainer finishes run 1 on its own
    assert (first / "DONE").exists()
    # 4. a third runner finishes what is left
    final = Launch(args, run_env(devices=1), logs)
    assert final.finish() == 0, final.out + final.err
    assert "2/2 runs done" in final.out, final.out

    for run_dir in (first, second):
        assert (run_dir / "DONE").exists()
        assert_each_step_once(run_dir, steps)
    log_one, log_two = (first / "train.log").read_text(), (second / "train.log").read_text()
    assert log_one.count("=== attempt") == 1, log_one  # never started twice
    assert log_two.count("=== attempt") == 2 and "resuming" in log_two, log_two
    assert sorted(p.name for p in SweepDir(tmp_path / "sweep").runs.iterdir()) == sorted(r.run_id for r in runs)

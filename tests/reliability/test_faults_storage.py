"""Storage failures: an unwritable or full run directory is refused before training starts; a failing
checkpoint write is retried with the state still in memory, and otherwise stops the run with one line
and the last good checkpoint intact. (Tests run as root, so chmod cannot make a directory read-only:
a path under a regular file stands in. A full disk is both injected, to hit exact points of the writer,
and real: a 16 MiB tmpfs filled up mid-run.)"""

import errno
import logging
import subprocess

import pytest

from helpers import tiny_config, train_losses, write_config
from lmu_jax.cli import main
from lmu_jax.config import config_from_dict
from lmu_jax.metrics import MetricsWriter
from lmu_jax.train import checkpoint
from lmu_jax.train.loop import Trainer
from reliability_helpers import assert_each_step_once, checkpoint_steps, state_leaves

STEPS = 16


def no_space(*_):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def setup(tmp_path, kjv_cache, monkeypatch):
    monkeypatch.setattr(checkpoint, "RETRY_DELAY_S", 0.0)
    raw = tiny_config(kjv_cache, train={"steps": STEPS}, checkpoint={"every": 4, "keep": 2})
    return raw, write_config(tmp_path / "c.yaml", raw)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err


def test_run_dir_that_cannot_be_a_directory(setup, tmp_path, capsys):
    _, config = setup
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for run_dir, words in [(blocker / "run", ["not writable", "Not a directory"]), (blocker, ["not writable"])]:
        assert main(["train", "--config", str(config), "--run-dir", str(run_dir)]) == 2
        err = one_line_error(capsys)
        assert all(w in err for w in words), err
        assert blocker.read_text() == "not a directory"


def test_full_disk_is_refused_before_training_and_leaves_nothing(setup, tmp_path, capsys, monkeypatch):
    _, config = setup
    monkeypatch.setattr("lmu_jax.storage.shutil.disk_usage", lambda path: type("U", (), {"free": 4096})())
    run = tmp_path / "runs" / "new"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
    err = one_line_error(capsys)
    assert "MiB free, less than one checkpoint" in err, err
    assert not run.exists()  # the launch made it, and took it away again


def test_a_failed_async_write_is_replaced_and_the_run_is_unaffected(setup, tmp_path, caplog, monkeypatch):
    raw, _ = setup
    cfg = config_from_dict(raw)
    Trainer(cfg, tmp_path / "straight").train()
    failures = []

    def disk_full_once():  # in orbax's write thread, after the files, before the commit
        if not failures:
            failures.append(1)
            no_space()

    monkeypatch.setattr(checkpoint, "_before_commit", disk_full_once)
    with caplog.at_level(logging.WARNING, logger="lmu_jax"):
        assert Trainer(cfg, tmp_path / "run").train()["status"] == "done"
    assert failures
    assert any("checkpoint 4 " in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "straight")
    assert_each_step_once(tmp_path / "run", STEPS)
    assert checkpoint_steps(tmp_path / "run") == [12, 16]
    print("FAULT ENOSPC once in an async checkpoint write: next save written through, steps lost 0")


def test_a_disk_that_stays_full_stops_the_run_with_the_last_good_checkpoint(setup, tmp_path, capsys, monkeypatch):
    raw, config = setup
    run = tmp_path / "run"
    writes = []

    def full_after_first():
        writes.append(1)
        if len(writes) > 1:
            no_space()

    monkeypatch.setattr(checkpoint, "_before_commit", full_after_first)
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
    err = one_line_error(capsys)
    assert "checkpoint of step 12 could not be written" in err and "No space left on device" in err, err
    assert f"the last good checkpoint is step 4 in {run / 'checkpoints'}, intact" in err, err
    assert checkpoint_steps(run) == [4] and not (run / "DONE").exists() and not (run / ".lock").exists()
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.isdigit()]
    assert all(".orbax-checkpoint-tmp" in name for name in leftovers), leftovers  # the next launch cleans up
    cfg = config_from_dict(raw)
    assert state_leaves(run, cfg)[-1] == 4  # the newest good checkpoint still restores (leaves end with "step")
    print("FAULT disk full from step 8 on: stopped at the failing save, last good checkpoint 4 intact")


def test_metrics_write_failure_says_where_and_what_survives(setup, tmp_path, capsys, monkeypatch):
    _, config = setup
    run = tmp_path / "run"
    original = MetricsWriter.write

    def write(self, record):
        if record.get("step") == 6:
            no_space()
        original(self, record)

    monkeypatch.setattr(MetricsWriter, "write", write)
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
    err = one_line_error(capsys)
    assert f"I/O error in --run-dir {run}" in err and "No space left on device" in err, err
    assert f"the last good checkpoint is step 4 in {run / 'checkpoints'}, intact" in err, err
    assert checkpoint_steps(run) == [4] and not (run / ".lock").exists()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 16 MiB tmpfs (the tests run as root, so they may mount one): ENOSPC from the kernel, not
    from a patched call."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.strip()})")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def test_a_real_full_filesystem_stops_the_run_and_a_rerun_with_space_resumes(setup, tmp_path, capsys,
                                                                               monkeypatch, small_filesystem):
    raw, config = setup
    Trainer(config_from_dict(raw), tmp_path / "straight").train()
    run = small_filesystem / "run"
    filler = small_filesystem / "filler"

    accept = checkpoint.Checkpointer._accept

    def fill_the_disk_once_4_is_verified(self, step):
        accept(self, step)
        if step == 4:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError as err:
                    assert err.errno == errno.ENOSPC

    monkeypatch.setattr(checkpoint.Checkpointer, "_accept", fill_the_disk_once_4_is_verified)
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2
    err = one_line_error(capsys)
    # which write meets the full disk first, a metrics append or checkpoint 8, depends on how much of a
    # page the filler left: either way the run stops with the cause and the checkpoint that survives
    assert "No space left on device" in err, err
    assert f"the last good checkpoint is step 4 in {run / 'checkpoints'}, intact" in err, err
    assert checkpoint_steps(run) == [4] and not (run / "DONE").exists() and not (run / ".lock").exists()
    assert state_leaves(run, config_from_dict(raw))[-1] == 4  # the last good checkpoint restores

    monkeypatch.undo()
    filler.unlink()  # space again: the same command resumes from step 4 and ends like an uninterrupted run
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    assert train_losses(run) == train_losses(tmp_path / "straight")
    assert_each_step_once(run, STEPS)
    print("FAULT real tmpfs full after checkpoint 4: stopped with one line, resumed from 4, steps lost <= 4")

"""lmu_jax.distributed: how a process finds its job (each source, with a made-up environment), the
agreement check, a failed start as one line, and every host preparing its own token cache."""

import numpy as np
import pytest

from helpers import finish_job, start_job, subprocess_env, tiny_config, write_config
from lmu_jax import distributed
from lmu_jax.config import DistributedConfig
from lmu_jax.errors import UserError

SLURM = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
         "SLURM_LOCALID": "0"}


@pytest.fixture
def no_tpu(monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)


@pytest.mark.parametrize("env, config, expected", [
    ({}, {}, ("single", None, None, None)),
    ({}, {"coordinator": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}, ("config", "10.0.0.1:1234", 4, 3)),
    ({"LMU_JAX_COORDINATOR": "127.0.0.1:5", "LMU_JAX_NUM_PROCESSES": "2", "LMU_JAX_PROCESS_ID": "1"}, {},
     ("environment", "127.0.0.1:5", 2, 1)),
    (SLURM, {}, ("slurm", None, 2, 1)),
    ({**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {}, ("single", None, None, None)),  # srun -n 1
    ({"SLURM_JOB_ID": "77"}, {}, ("single", None, None, None)),  # inside salloc, not srun: no step
    ({"OMPI_MCA_orte_hnp_uri": "1.2.3.4:1", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5"}, {},
     ("open-mpi", None, 8, 5)),
    ({"TPU_WORKER_HOSTNAMES": "a,b", "TPU_WORKER_ID": "1"}, {}, ("cloud-tpu", None, None, 1)),  # GKE
])
def test_detect_each_source(no_tpu, env, config, expected):
    launch = distributed.detect(DistributedConfig(**config), env)
    assert (launch.source, launch.coordinator, launch.num_processes, launch.process_id) == expected


def test_detect_cloud_tpu_vm_and_worker_index(monkeypatch):
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    launch = distributed.detect(DistributedConfig(), {"LMU_JAX_WORKER_ID": "3"})  # set by tpu/ launcher jobs
    assert launch.source == "cloud-tpu" and launch.process_id == 3
    assert distributed.job_process({"LMU_JAX_WORKER_ID": "3"}) == (3, None)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: False)
    assert distributed.job_process({}) is None
    assert distributed.job_process(SLURM) == (1, 2)


def test_detect_bad_environment_is_one_line(no_tpu):
    with pytest.raises(UserError, match="LMU_JAX_PROCESS_ID='x' must be an integer"):
        distributed.detect(DistributedConfig(), {"LMU_JAX_COORDINATOR": "h:1", "LMU_JAX_NUM_PROCESSES": "2",
                                                 "LMU_JAX_PROCESS_ID": "x"})


def test_check_agreement_names_what_differs(monkeypatch):
    other = {"local device count": 4, "mesh shape": {"data": 2, "fsdp": 4}, "config (run id)": "abc"}
    mine = dict(other, **{"mesh shape": {"data": 4, "fsdp": 2}})

    def allgather(local):  # process 0 is this one; process 1 holds `other`
        theirs = np.zeros_like(local)
        for row, value in enumerate(other.values()):
            text = str(value).encode()
            theirs[row, :len(text)] = np.frombuffer(text, np.uint8)
        return np.stack([local, theirs])

    monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", allgather)
    distributed.check_agreement(other)  # the same everywhere: silent
    with pytest.raises(UserError) as err:
        distributed.check_agreement(mine)
    assert str(err.value).startswith("the processes disagree on mesh shape: process 0 has {'data': 4, 'fsdp': 2}, "
                                     "process 1 has {'data': 2, 'fsdp': 4}")


def test_unreachable_coordinator_is_a_clear_error(tmp_path, kjv_cache):
    """Process 1 of 2 with nobody at the coordinator's address: one error line within the timeout."""
    config = write_config(tmp_path / "c.yaml", tiny_config(kjv_cache, distributed={"timeout_s": 3}))
    [(code, out)] = finish_job(start_job([["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]],
                                         envs=[{"LMU_JAX_NUM_PROCESSES": "2", "LMU_JAX_PROCESS_ID": "1"}]),
                               timeout=120)
    assert code == 2, out
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert error and "jax.distributed.initialize failed (environment: coordinator 127.0.0.1:" in error[0], out
    assert "nothing accepts connections" in error[0]
    assert "Traceback" not in out and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_each_host_prepares_its_own_cache_and_disagreement_is_one_line(tmp_path):
    """Two processes with separate disks (HOME, hence data.cache_dir=~/cache, differs): each tokenizes the
    corpus itself and they train together. Then a process with other devices is refused in one line."""
    raw = tiny_config("~/cache", train={"steps": 3}, mesh={"data": 4, "fsdp": 2}, checkpoint={"every": 0})
    config = write_config(tmp_path / "c.yaml", raw)
    homes = [tmp_path / "host0", tmp_path / "host1"]
    command = ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    results = finish_job(start_job([command, command], envs=[{"HOME": str(h)} for h in homes]))
    for (code, out), home in zip(results, homes):
        assert code == 0, out
        assert "data: tokenizing kjv" in out  # this host had no cache: it made its own
        assert list((home / "cache").glob("kjv-*/byte/meta.json"))
    assert (tmp_path / "run" / "DONE").exists()

    envs = [{"HOME": str(homes[0])},
            {"HOME": str(homes[1]), "XLA_FLAGS": subprocess_env(2)["XLA_FLAGS"]}]
    odd = ["train", "--config", str(config), "mesh.data=3", "train.batch_size=12", "--run-dir", str(tmp_path / "odd")]
    results = finish_job(start_job([odd, odd], envs=envs))
    for code, out in results:
        assert code == 2, out
        assert ("error: the processes disagree on local device count: process 0 has 4, process 1 has 2"
                in out), out

"""A spec's `results` directory: each finished run's small files are kept there as it finishes, and a
fresh sweep directory (a fresh clone) counts the kept runs as done instead of training them again."""

import json

import pytest
import yaml

from helpers import cli_subprocess
from test_sweep import spec_dict

from lmu_jax.config import read_yaml
from lmu_jax.errors import UserError
from lmu_jax.sweep.runner import RESULT_FILES, STATUS_FILE
from lmu_jax.sweep.spec import expand, parse_spec


def test_finished_runs_are_kept_in_results_and_a_fresh_sweep_dir_resumes_from_them(tmp_path, kjv_cache):
    results = tmp_path / "repo" / "experiments" / "results" / "t"
    spec_path = tmp_path / "t.yaml"
    spec_path.write_text(yaml.safe_dump(spec_dict(kjv_cache, families=["transformer"], sizes=[5_000, 10_000],
                                                  budgets={"flops": [4.0e8]}, results=str(results))))
    (first_id, second_id) = [r.run_id for r in expand(parse_spec(read_yaml(spec_path)))]
    machine = tmp_path / "machine-1"
    only_first = ["sweep", "run", str(spec_path), "--sweep-dir", str(machine), "--only", first_id, "--no-progress"]
    assert cli_subprocess(only_first, devices=1, timeout=600).returncode == 0

    kept = results / "runs" / first_id
    assert sorted(p.name for p in kept.iterdir()) == sorted((*RESULT_FILES, STATUS_FILE))
    record = json.loads((kept / STATUS_FILE).read_text())
    assert record["state"] == "done" and record["ended"] > record["started"]
    assert not {"host", "pid", "command", "log_tail"} & set(record)  # nothing of the machine it ran on
    assert not (results / "runs" / second_id).exists()

    # Another machine, a fresh sweep directory: the kept run is done, only the other one trains.
    other = tmp_path / "machine-2"
    status = cli_subprocess(["sweep", "status", str(spec_path), "--sweep-dir", str(other)], devices=1)
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[:-1]}
    assert " done " in lines[first_id] and " pending " in lines[second_id], status.stdout
    run = cli_subprocess(["sweep", "run", str(spec_path), "--sweep-dir", str(other), "--no-progress"], devices=1,
                         timeout=600)
    assert run.returncode == 0 and "2/2 runs done" in run.stdout, run.stdout + run.stderr
    assert run.stderr.count("done before; skipped") == 1
    assert not (other / "runs" / first_id / "train.log").exists()  # restored, not retrained
    assert (results / "runs" / second_id / "DONE").exists()
    assert (other / "runs" / first_id / "eval.json").read_bytes() == (kept / "eval.json").read_bytes()

    collected = cli_subprocess(["sweep", "collect", str(spec_path), "--sweep-dir", str(other)], devices=1)
    assert collected.returncode == 0 and "2 finished runs" in collected.stdout


def test_results_must_be_a_path(kjv_cache):
    with pytest.raises(UserError, match="results"):
        parse_spec(spec_dict(kjv_cache, results=["a", "b"]))

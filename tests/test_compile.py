"""`lmu-jax compile`: the real train step compiled ahead of time for a topology, per-device memory."""

import os
import re
import subprocess
import sys

from helpers import REPO, cli_subprocess, subprocess_env


def test_compiles_for_a_cpu_topology_and_reports_memory():
    out = cli_subprocess(["compile", "--topology", "cpu-4", "model.d_model=64", "mesh.fsdp=2",
                          "train.batch_size=8"], devices=8)
    assert out.returncode == 0, out.stderr
    assert "for 4 CPU devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out.stdout  # 4, not the 8 of XLA_FLAGS
    sizes = dict(re.findall(r"^  (arguments|temporaries|total)\S* .*?  ([\d.]+) [MG]iB", out.stdout, re.M))
    assert set(sizes) == {"arguments", "temporaries", "total"}, out.stdout
    assert float(sizes["arguments"]) > 0 and float(sizes["total"]) >= float(sizes["arguments"])


def test_a_family_with_a_carry_compiles_with_its_stream_starts_input():
    out = cli_subprocess(["compile", "--topology", "cpu-2", "model.family=transformer_xl", "model.d_model=32",
                          "model.n_layers=1", "model.n_head=2", "model.mem_len=8", "data.seq_len=16",
                          "train.batch_size=4"], devices=8)
    assert out.returncode == 0, out.stderr
    assert "train step of transformer_xl for 2 CPU devices" in out.stdout, out.stdout


def test_a_tpu_topology_without_libtpu_says_so_and_offers_the_nearest(tmp_path):
    # a `libtpu` that fails to import hides the installed one, as on a machine without the tpu extra
    (tmp_path / "libtpu").mkdir()
    (tmp_path / "libtpu" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = subprocess_env(PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    env.pop("TPU_LIBRARY_PATH", None)  # JAX sets it in this process once it has loaded libtpu
    out = subprocess.run([sys.executable, "-m", "lmu_jax.cli", "compile", "--topology", "v5e-256"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: --topology v5e-256: the installed JAX cannot describe this TPU topology")
    assert "--topology cpu-256" in out.stderr
    bad = cli_subprocess(["compile", "--topology", "v9-3"])
    assert bad.returncode == 2 and "--topology='v9-3' is invalid" in bad.stderr

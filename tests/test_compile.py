"""`lmu-jax compile`: the real train step compiled ahead of time for a topology, per-device memory."""

import re

from helpers import cli_subprocess


def test_compiles_for_a_cpu_topology_and_reports_memory():
    out = cli_subprocess(["compile", "--topology", "cpu-4", "model.d_model=64", "mesh.fsdp=2",
                          "train.batch_size=8"], devices=8)
    assert out.returncode == 0, out.stderr
    assert "for 4 CPU devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out.stdout  # 4, not the 8 of XLA_FLAGS
    sizes = dict(re.findall(r"^  (arguments|temporaries|total)\S* .*?  ([\d.]+) [MG]iB", out.stdout, re.M))
    assert set(sizes) == {"arguments", "temporaries", "total"}, out.stdout
    assert float(sizes["arguments"]) > 0 and float(sizes["total"]) >= float(sizes["arguments"])


def test_a_carried_state_family_compiles_with_its_stream_starts_input():
    out = cli_subprocess(["compile", "--topology", "cpu-2", "model.family=transformer_xl", "model.d_model=32",
                          "model.n_layers=1", "model.n_head=2", "model.mem_len=8", "data.seq_len=16",
                          "train.batch_size=4"], devices=8)
    assert out.returncode == 0, out.stderr
    assert "train step of transformer_xl for 2 CPU devices" in out.stdout, out.stdout


def test_a_tpu_topology_without_libtpu_says_so_and_offers_the_nearest():
    out = cli_subprocess(["compile", "--topology", "v5e-256"])
    if out.returncode == 0:  # a machine with libtpu really compiles it
        assert "v5litepod-256: 256 chips" in out.stdout and "device HBM" in out.stdout
        return
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: --topology v5e-256: the installed JAX cannot describe this TPU topology")
    assert "--topology cpu-256" in out.stderr
    bad = cli_subprocess(["compile", "--topology", "v9-3"])
    assert bad.returncode == 2 and "--topology='v9-3' is invalid" in bad.stderr

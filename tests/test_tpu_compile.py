"""Every family's train step compiled ahead of time for real TPU topologies, on this CPU host.

libtpu (the `tpu` extra, which `make test` installs) describes TPU slices to XLA and compiles for them
without a TPU. Each family compiles twice: for a v5e 4x4 slice (16 chips) with pure data parallelism,
and for a v4 2x2x4 slice (16 chips) with fsdp 4 x tensor 2 x data 2. Without libtpu the module is skipped.
"""

import json
import re

import pytest

pytest.importorskip("libtpu", reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")

from helpers import FAMILY_TINY, cli_subprocess  # noqa: E402

from lmu_jax.config import load_config  # noqa: E402
from lmu_jax.train.compile import (  # noqa: E402
    CHIPS, compile_train_step, lower_train_step, peak_bytes, topology_devices)

SLICES = {"v5litepod-16": ("v5e", ["mesh.data=-1"], {"data": 16, "fsdp": 1, "tensor": 1}),
          "v4-32": ("v4", ["mesh.data=-1", "mesh.fsdp=4", "mesh.tensor=2"], {"data": 2, "fsdp": 4, "tensor": 2})}


@pytest.fixture(scope="module")
def slices():
    return {name: topology_devices(name)[0] for name in SLICES}


def tiny(family: str, *extra: str):
    keys = [f"model.{key}={json.dumps(value)}" for key, value in FAMILY_TINY[family].items()]
    return load_config(None, [f"model.family={family}", *keys, "data.seq_len=32", "train.batch_size=16", *extra])


@pytest.mark.parametrize("family", sorted(FAMILY_TINY))
def test_every_family_compiles_for_two_tpu_topologies(family, slices):
    arguments = {}
    for name, (generation, mesh, shape) in SLICES.items():
        compiled, step = compile_train_step(tiny(family, *mesh), slices[name])
        assert dict(step.mesh.shape) == shape
        assert {d.platform for d in step.mesh.devices.flat} == {"tpu"}
        assert 0 < peak_bytes(compiled) < CHIPS[generation][0] * 2**30
        assert compiled.cost_analysis()["flops"] > 0
        arguments[name] = compiled.memory_analysis().argument_size_in_bytes
    # the parameters and optimizer state are split 8 ways on the fsdp x tensor mesh, whole on each chip
    # of the data-parallel one
    assert arguments["v4-32"] < arguments["v5litepod-16"] / 2


def test_auto_memory_impl_follows_the_platform_compiled_for(slices):
    import jax

    # order 256 at n 32: auto takes the FFT on CPU (lmu_memory_cpu.md) and the chunked scan on TPU
    cfg = tiny("lmu", "model.order=256", "model.q_reduced=8", "mesh.data=-1")
    tpu_text = lower_train_step(cfg, slices["v5litepod-16"])[0].as_text()
    cpu_text = lower_train_step(cfg, jax.devices("cpu")[:1])[0].as_text()
    assert "stablehlo.fft" in cpu_text and "stablehlo.fft" not in tpu_text


def test_compile_refuses_what_does_not_fit_in_one_line():
    # 2**18 sequences of 32 tokens on one v5e chip: XLA's TPU compiler refuses the temporaries (~55 GiB)
    out = cli_subprocess(["compile", "--topology", "v5litepod-1", "model.d_model=64", "model.n_layers=1",
                          "data.seq_len=32", "train.batch_size=262144"])
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    need = re.fullmatch(r"error: the train step of transformer needs ([\d.]+) GiB per device \(XLA's count of its "
                        r"HLO temporaries alone\), a TPU v5 lite chip has ([\d.]+) GiB: raise mesh\.fsdp \(.*\); "
                        r"raise train\.microbatches \(now 1; .*\)\n", out.stderr)
    assert need and float(need.group(1)) > float(need.group(2)) > 15, out.stderr


def test_roofline_estimate_from_the_compiled_step(slices):
    from lmu_jax.train.compile import roofline, roofline_rows

    compiled, step = compile_train_step(tiny("transformer", "mesh.data=-1"), slices["v5litepod-16"])
    model_flops = 16 * 32 * step.flops_per_token
    est = roofline(compiled, slices["v5litepod-16"], "v5e", model_flops)
    assert est["peak_flops"] == 197e12 and est["hbm_bandwidth"] == 819e9
    assert est["seconds"] == max(est["flops"] / 197e12, est["bytes"] / 819e9) > 0
    assert est["mfu"] == pytest.approx(model_flops / 16 / 197e12 / est["seconds"])
    rows = dict(roofline_rows(est, "TPU v5 lite"))
    assert rows["TPU v5 lite peak (published)"] == "197 TFLOP/s bf16, 819 GB/s HBM"
    assert re.fullmatch(r"[\d.]+ ms, (compute|memory)-bound", rows["roofline step time (estimate)"])


def test_compile_prints_memory_and_the_roofline_estimate_for_a_slice():
    out = cli_subprocess(["compile", "--topology", "v5e-256", "model.d_model=64", "model.n_layers=1",
                          "data.seq_len=32", "train.batch_size=256"])
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # libtpu's complaints about the TPU VM metadata it cannot find are silenced
    assert "for v5litepod-256: 256 chips, mesh {'data': 256, 'fsdp': 1, 'tensor': 1}" in out.stdout
    assert re.search(r"device HBM\s+16.00 GiB: fits", out.stdout)
    assert re.search(r"TPU v5 lite peak \(published\)\s+197 TFLOP/s bf16, 819 GB/s HBM", out.stdout)
    assert re.search(r"roofline step time \(estimate\)\s+[\d.]+ ms, (compute|memory)-bound", out.stdout)
    assert re.search(r"implied MFU \(estimate, analytic FLOPs\)\s+[\d.]+%", out.stdout)

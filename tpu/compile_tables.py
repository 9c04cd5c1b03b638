"""Tables from ahead-of-time compiles for TPU chips (needs libtpu: pip install -e ".[tpu]"); no TPU needed.

    python -m tpu.compile_tables memory   # -> benchmarks/results/tpu_lmu_memory.md (+ .json)
    python -m tpu.compile_tables sweeps   # -> benchmarks/results/tpu_compile.md (+ .json)

``memory``: every LMU memory implementation, forward + backward (benchmarks/lmu_memory.py's loss: the
gradient of 0.5 * sum(out**2)), compiled for one chip at the pod sweeps' shapes: sequence length n and
order (defaults: n 1024, 4096, 16384; orders 64 and 256; chips v5e and v4; both forms), a fixed 16,384
tokens x 256 channels per device (the per-device slice of a d 256 layer at batch x n = 16,384). Per
point: XLA's compiled memory (temporaries and the whole program) and its cost analysis with the chip's
roofline (lmu_jax.train.compile.roofline). It is the evidence for impl="auto"'s TPU and GPU rows in
lmu_jax/ops/memory.py. One point takes 1-10 minutes to compile on a busy 2-core host.

``sweeps``: the train step of the pod configs in experiments/ (SWEEP_TARGETS; a sweep's families at its
smallest and largest size, or ``--sizes largest``) compiled for a target slice, as `lmu-jax compile`
does: per-device memory, fits or not, the roofline estimate.

``--render`` rewrites a table's markdown from its JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
TOKENS_PER_DEVICE, CHANNELS = 16384, 256
CHIP_SLICES = {"v4": "v4-8", "v5e": "v5litepod-1"}  # one chip of each: the programs are per device


def _devices(slice_name: str):
    from lmu_jax.train.compile import topology_devices

    devices, _, generation = topology_devices(slice_name)
    return devices, generation


def memory_point(devices, generation: str, impl: str, form: str, n: int, order: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks.lmu_memory import _loss_and_grad, reduced_width
    from lmu_jax.ops.memory import compiling_for
    from lmu_jax.train.compile import peak_bytes, roofline

    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("d",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    args = [jax.ShapeDtypeStruct((TOKENS_PER_DEVICE // n, n, CHANNELS), jnp.float32, sharding=whole)]
    if form == "folded":
        args.append(jax.ShapeDtypeStruct((reduced_width(order), order), jnp.float32, sharding=whole))
    started = time.perf_counter()
    with compiling_for("tpu"):
        compiled = _loss_and_grad(form, impl, order, float(n)).lower(*args).compile()
    memory = compiled.memory_analysis()
    point = {"impl": impl, "form": form, "n": n, "order": order, "batch": TOKENS_PER_DEVICE // n,
             "channels": CHANNELS, "temp_bytes": memory.temp_size_in_bytes, "total_bytes": peak_bytes(compiled),
             "compile_s": round(time.perf_counter() - started, 1)}
    point.update(roofline(compiled, devices[:1], generation, 0.0))
    del point["mfu"]
    return point


def run_memory(chips, forms, orders, lengths, done=lambda results: None) -> dict:
    """The grid; ``done(results so far)`` after every point (a long run leaves its table as it goes)."""
    from lmu_jax.ops.memory import select_memory_impl

    points = []
    results = {"what": "LMU memory forward + backward compiled for one TPU chip (AOT, no TPU attached)",
               "tokens_per_device": TOKENS_PER_DEVICE, "channels": CHANNELS, "points": points}
    for generation in chips:
        devices, _ = _devices(CHIP_SLICES[generation])
        for form in forms:
            for order in orders:
                for n in lengths:
                    for impl in ("chunked", "fft", "sequential"):
                        try:
                            point = memory_point(devices, generation, impl, form, n, order)
                        except Exception as error:  # noqa: BLE001 - a refused point is recorded, not hidden
                            point = {"impl": impl, "form": form, "n": n, "order": order,
                                     "error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
                        point.update(chip=generation, device=devices[0].device_kind,
                                     auto=select_memory_impl(n, order, form == "folded", platform="tpu"))
                        points.append(point)
                        print(json.dumps({k: point.get(k) for k in ("chip", "form", "order", "n", "impl",
                                                                    "total_bytes", "seconds", "compile_s", "error")}),
                              flush=True)
                    done(results)
    return results


def memory_markdown(results: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = [
        "# LMU memory kernels compiled for TPU chips (ahead of time, no TPU attached)", "",
        "`python -m tpu.compile_tables memory` (needs libtpu). Forward + backward of the gradient of "
        "0.5·sum(out²) (as benchmarks/lmu_memory.py) at "
        f"{results['tokens_per_device']:,} tokens × {results['channels']} channels per device (batch = "
        f"{results['tokens_per_device']:,} / n), float32, compiled by XLA for one chip. *folded* is what the "
        "LM block runs (r = 3·order//10 folded kernels); *memory* forms the whole (batch, n, channels, order) "
        "memory. Memory: XLA's `memory_analysis()` (temporaries; total = arguments + outputs - aliased + "
        "temporaries + code), GiB per device. Roofline: max(FLOPs / peak bf16 FLOP/s, HBM bytes / HBM "
        "bandwidth) from XLA's `cost_analysis()` and the chip's published peaks, in ms: **an estimate**, "
        "not a measurement (the kernels compute in float32, which runs below the bf16 peak). The sequential "
        "scan is a while loop, whose body XLA counts once: its FLOPs and bytes are those of one step, so its "
        "roofline (marked *loop*) is not an estimate of its time; it also runs n dependent steps in order.", ""]
    for chip in dict.fromkeys(p["chip"] for p in results["points"]):
        device = next(p["device"] for p in results["points"] if p["chip"] == chip)
        lines += [f"## {chip} ({device})", "",
                  "| form | order | n | total GiB: chunked / fft / sequential | temporaries GiB: chunked / fft / "
                  "sequential | roofline ms: chunked / fft / sequential | least memory | auto (tpu) |",
                  "|---|---|---|---|---|---|---|---|"]
        rows: dict = {}
        for p in results["points"]:
            if p["chip"] == chip:
                rows.setdefault((p["form"], p["order"], p["n"]), {})[p["impl"]] = p
        for (form, order, n), by_impl in rows.items():
            impls = [i for i in ("chunked", "fft", "sequential") if i in by_impl]
            cell = lambda key, fmt: " / ".join(  # noqa: E731
                ("refused" if "error" in by_impl[i] else fmt(by_impl[i])) if i in by_impl else "not run"
                for i in ("chunked", "fft", "sequential"))
            ok = {i: by_impl[i]["total_bytes"] for i in impls if "error" not in by_impl[i]}
            lines.append(f"| {form} | {order} | {n} | {cell('total', lambda p: gib(p['total_bytes']))} | "
                         f"{cell('temp', lambda p: gib(p['temp_bytes']))} | "
                         f"{cell('ms', lambda p: format(p['seconds'] * 1e3, '.2f') + ' loop' * p['loops'])} | "
                         f"{min(ok, key=ok.get) if ok else '-'} | {by_impl[impls[0]]['auto']} |")
        lines.append("")
    errors = [p for p in results["points"] if "error" in p]
    if errors:
        lines += ["Refused points:", ""] + [f"- {p['chip']} {p['form']} order {p['order']} n {p['n']} "
                                            f"{p['impl']}: {p['error']}" for p in errors] + [""]
    return "\n".join(lines)


EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# (config or sweep spec, target slice): the LMU paper's sweep names a v4-8 slice for its throughput
# estimate; the enwik8 configs' batches (24, 32) divide over a v4-8's 4 chips.
SWEEP_TARGETS = [("lmu_paper_owt2.yaml", "v4-8"), ("configs/transformer_xl_enwik8_base.yaml", "v4-8"),
                 ("configs/sch_txl_enwik8_phase1.yaml", "v4-8")]


def sweep_configs(sizes: str):
    """(source, label, RunConfig) of every pod config: a sweep's families at its smallest and largest
    size (``sizes="ends"``) or its largest only (``"largest"``); a single config as it is."""
    from lmu_jax.config import load_config
    from lmu_jax.sweep.spec import expand, load_spec

    for source, target in SWEEP_TARGETS:
        path = EXPERIMENTS / source
        if source.startswith("configs/"):
            yield source, path.stem, load_config(str(path), []), target
            continue
        runs = expand(load_spec(path))
        for family in dict.fromkeys(r.family for r in runs):
            ladder = sorted((r for r in runs if r.family == family), key=lambda r: r.size)
            for run in (ladder[-1:] if sizes == "largest" else [ladder[0], ladder[-1]]):
                yield source, f"{family} N={run.n_params:,}", run.config, target
            run = ladder[-1]
            label, cfg = f"{family} N={run.n_params:,}", run.config
            if getattr(cfg.model, "memory_impl", "auto") != "auto":  # the sweep's pinned LMU memory vs auto's
                cfg = cfg.replace(model=dataclasses.replace(cfg.model, memory_impl="auto"))
                label += ", memory_impl=auto"
                if family == "lmu":
                    yield source, label, cfg, target
            # gradient accumulation: the same batch in 4 passes (what fits where one pass does not)
            yield source, f"{label}, microbatches=4", cfg.replace(
                train=dataclasses.replace(cfg.train, microbatches=4)), target


def run_sweeps(sizes: str, done=lambda results: None, previous=(), only: str = "") -> dict:
    """Every pod config's row; ``done(results so far)`` after each; rows of ``previous`` (an earlier
    run's) are kept, not compiled again."""
    from lmu_jax.train.compile import CHIPS, compile_train_step, peak_bytes, roofline

    rows, devices = [], {}
    results = {"what": "train steps of the experiments/ pod configs compiled for their target slices (AOT)",
               "rows": rows}
    kept = {(r["source"], r["run"], r["slice"]): r for r in previous}
    for source, label, cfg, target in sweep_configs(sizes):
        if only not in label:
            continue
        if (source, label, target) in kept:
            rows.append(kept[(source, label, target)])
            continue
        if target not in devices:
            devices[target] = _devices(target)
        slice_devices, generation = devices[target]
        started = time.perf_counter()
        row = {"source": source, "run": label, "slice": target, "family": cfg.model.family,
               "batch": cfg.train.batch_size, "seq_len": cfg.data.seq_len}
        try:
            compiled, step = compile_train_step(cfg, slice_devices)
            memory = compiled.memory_analysis()
            row.update(memory_impl=getattr(step.model_cfg, "memory_impl", None), mesh=dict(step.mesh.shape),
                       total_bytes=peak_bytes(compiled), temp_bytes=memory.temp_size_in_bytes,
                       argument_bytes=memory.argument_size_in_bytes, hbm_bytes=CHIPS[generation][0] * 2**30,
                       **roofline(compiled, slice_devices, generation,
                                  cfg.train.batch_size * step.seq_len * step.flops_per_token))
        except Exception as error:  # noqa: BLE001 - a refused compile is a finding, recorded
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        row["compile_s"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("run", "slice", "total_bytes", "seconds", "mfu", "compile_s",
                                                   "error")}), flush=True)
        done(results)
    done(results)  # also when every row was kept
    return results


def sweeps_markdown(results: dict) -> str:
    lines = [
        "# Pod configs compiled for their target TPU slices (ahead of time, no TPU attached)", "",
        "`python -m tpu.compile_tables sweeps` (needs libtpu); one row is `lmu-jax compile --config FILE "
        "--topology SLICE` (a sweep's run: its resolved config, as `lmu-jax sweep plan` lists it). Memory: "
        "XLA's compiled memory per device (arguments + outputs - aliased + temporaries + code) against the "
        "chip's HBM. Step time and MFU: **roofline estimates**, max(FLOPs / peak bf16 FLOP/s, HBM bytes / "
        "HBM bandwidth) from XLA's cost analysis and the chip's published peaks, MFU = the model's analytic "
        "training FLOPs over that time at peak; *loop*: the program has a while loop (a scan), whose body "
        "XLA counts once, so its estimate is a lower bound on the time (an upper bound on MFU). With "
        "microbatches=k the accumulation loop's body is one microbatch: its counts are scaled by k (the "
        "optimizer update, counted once, is then counted k times; an LSTM's own scan stays undercounted). "
        "*auto*: the LMU memory's pick on TPU, the chunked scan (lmu_jax/ops/memory.py). A row whose run "
        "names a change (memory_impl=auto, microbatches=4) is the sweep's run with that change.", "",
        "| config | run | slice | batch x n | mesh | LMU memory | GiB per device | fits | step ms (est.) | "
        "bound | MFU (est.) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        head = f"| {r['source']} | {r['run']} | {r['slice']} | {r['batch']} x {r['seq_len']} |"
        refused = re.search(r"needs ([\d.]+) GiB per device(.*?), a .* has ([\d.]+) GiB", r.get("error", ""))
        if refused:  # XLA's TPU compiler refuses a program whose temporaries exceed the HBM
            lines.append(f"{head} | | {refused.group(1)}{refused.group(2)} of {refused.group(3)} | **no**, XLA "
                         f"refuses it | | | |")
            continue
        if "error" in r:
            lines.append(f"{head} refused: {r['error']} | | | | | | |")
            continue
        mesh = " ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        fits = "yes" if r["total_bytes"] <= r["hbm_bytes"] else f"**no** ({r['total_bytes'] / r['hbm_bytes']:.1f}x)"
        loop = " loop" if r["loops"] else ""
        parts = int((re.search(r"microbatches=(\d+)", r["run"]) or [0, 1])[1])  # XLA counted one of them
        lines.append(f"{head} {mesh} | {r['memory_impl'] or '-'} | {r['total_bytes'] / 2**30:.2f} of "
                     f"{r['hbm_bytes'] / 2**30:.0f} | {fits} | {r['seconds'] * parts * 1e3:.1f}{loop} | "
                     f"{r['bound']} | {r['mfu'] / parts:.0%}{loop} |")
    return "\n".join(lines) + "\n"


def write(name: str, results: dict, markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(f"wrote {RESULTS / name}.md and .json", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=("memory", "sweeps"))
    numbers = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--chips", default="v5e,v4", help="memory: chip generations (v4, v5e)")
    parser.add_argument("--forms", default="folded,memory", help="memory: folded (what the LM block runs), memory")
    parser.add_argument("--orders", type=numbers, default=[64, 256], help="memory: orders")
    parser.add_argument("--lengths", type=numbers, default=[1024, 4096, 16384], help="memory: sequence lengths")
    parser.add_argument("--sizes", choices=("ends", "largest"), default="ends",
                        help="sweeps: each family at the sweep's smallest and largest size, or the largest")
    parser.add_argument("--resume", action="store_true", help="sweeps: keep the rows tpu_compile*.json have")
    parser.add_argument("--only", default="", help="sweeps: only the runs whose label contains this")
    parser.add_argument("--out", default="tpu_compile", help="sweeps: the table's name in benchmarks/results")
    parser.add_argument("--render", action="store_true", help="rewrite the table's .md from its committed .json")
    args = parser.parse_args(argv)
    if args.render:
        name, markdown = {"memory": ("tpu_lmu_memory", memory_markdown), "sweeps": ("tpu_compile", sweeps_markdown)}[
            args.table]
        results = json.loads((RESULTS / f"{name}.json").read_text())
        write(name, results, markdown(results))
        return 0
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.table == "memory":
        results = run_memory(args.chips.split(","), args.forms.split(","), args.orders, args.lengths,
                             done=lambda partial: write("tpu_lmu_memory", partial, memory_markdown(partial)))
    else:
        # --resume keeps the rows of every tpu_compile*.json (also those of --out runs made beside it)
        previous = [row for path in sorted(RESULTS.glob("tpu_compile*.json")) if args.resume
                    for row in json.loads(path.read_text())["rows"] if "compile_s" in row]
        run_sweeps(args.sizes, done=lambda partial: write(args.out, partial, sweeps_markdown(partial)),
                   previous=previous, only=args.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""XLA:CPU compiler options against the default, on the Trainer's train step at the peers' shapes.

    python -m benchmarks.xla_flags [--shapes transformer:256,lstm:256] [--variants a,b] [--rounds 4]
        -> benchmarks/results/cpu_xla_flags.json and .md

Every variant is the same jitted train step (the run's program, lmu_jax/train/builder.py, at our
default settings: ``train.microbatches: auto``) compiled with other ``DebugOptions`` passed as
``compiler_options`` to ``.compile()``, which is what ``XLA_FLAGS`` sets for the whole process. So all
variants live in one process and are timed interleaved, one step of each per round: load that comes and
goes on a shared machine falls on all alike. Each variant starts from the same initial state and sees the
same batches, so the losses say whether an option changes the numbers: bit-identical, or how far.

Options that only ``XLA_FLAGS`` can set (``xla_backend_extra_options``, a map field) are not here. Nor
is oneDNN (``xla_cpu_use_onednn`` with ``xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT``):
it aborts the process while compiling the transformer ("partition compile failed"), and the LSTM's loss
after 3 steps moved by 0.15 under it (benchmarks/results/cpu_xla_flags.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform as host_platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import write_json_and_markdown
from benchmarks.suite import model_section, run_config

# name -> DebugOptions fields. In jax 0.10.2 XLA:CPU sends dots to YNNPACK ("individual dot" fusions);
# an empty ynn list sends them back to XLA's own (Eigen) dot emitter, which the other dot back-ends replace.
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
VARIANTS = {
    "default": {},
    "ynn_off (Eigen dots)": NO_YNN,
    "ynn dot+eltwise+reduce fusions": {"xla_cpu_experimental_ynn_fusion_type": ",".join(
        f"LIBRARY_FUSION_TYPE_{t}" for t in ("INDIVIDUAL_DOT", "DOT", "ELTWISE", "REDUCE"))},
    "xnn dot fusions": {**NO_YNN, "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "xnn greedy graph fusion": {**NO_YNN, "xla_cpu_experimental_xnn_graph_fusion_mode": "XNN_GRAPH_FUSION_MODE_GREEDY"},
    "no concurrency-optimized scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "memory-optimized scheduler": {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"},
    "vector width 512": {"xla_cpu_prefer_vector_width": 512},
    "fast math (changes numerics)": {"xla_cpu_enable_fast_math": True},
}
N_LAYERS = {"transformer": 4, "lstm": 2}  # the peers' models (benchmarks/peers.py), batch 16 x 256 tokens
SEQ_LEN, BATCH = 256, 16


def peer_shape_config(family: str, d_model: int, cache_dir: str):
    """The run config of a peer's model (benchmarks/peers.py) at our default settings, float32."""
    extra = {"positions": "learned"} if family == "transformer" else {}
    return run_config(model_section(family, d_model, N_LAYERS[family], "float32", **extra), SEQ_LEN, BATCH,
                      cache_dir, 1_000_000, microbatches="auto")


def compare(family: str, d_model: int, variants: dict, rounds: int, cache_dir: str) -> dict:
    """Each variant's compiled train step at (family, d_model), timed interleaved over `rounds` rounds."""
    from lmu_jax.train.loop import StepInputs, open_program

    program, cache = open_program(peer_shape_config(family, d_model, cache_dir), jax.devices()[:1])
    inputs = StepInputs(program, cache)
    batches = [inputs(i) for i in range(4)]
    lowered = program.train_step.lower(program.init_state(), *batches[0])
    runs = {}
    for name, options in variants.items():
        started = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options=options)
        except Exception as error:  # noqa: BLE001 - an option this build rejects is recorded, not hidden
            runs[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
            continue
        text = compiled.as_text()
        runs[name] = {"compiled": compiled, "state": program.init_state(), "times": [], "losses": [],
                      "compile_s": time.perf_counter() - started,
                      "library_calls": {k: text.count(k) for k in ("__ynn_fusion", "__xnn_fusion", "onednn")}}
    live = {name: run for name, run in runs.items() if "compiled" in run}
    loads = []
    for step in range(rounds + 1):  # step 0 warms up (first-touch allocations): its loss counts, its time not
        batch = batches[step % len(batches)]
        loads.append(float(open("/proc/loadavg").read().split()[0]))
        for run in live.values():
            start = time.perf_counter()
            run["state"], metrics = run["compiled"](run["state"], *batch)
            jax.block_until_ready((run["state"], metrics))
            if step:
                run["times"].append(time.perf_counter() - start)
            run["losses"].append(float(metrics["loss"]))
    base = runs["default"]
    point = {"family": family, "d_model": d_model, "n_layers": N_LAYERS[family], "batch": BATCH, "seq_len": SEQ_LEN,
             "microbatches": program.cfg.train.microbatches, "rounds": rounds,
             "load_min": min(loads), "load_max": max(loads), "variants": {}}
    for name, run in runs.items():
        if "error" in run:
            point["variants"][name] = run
            continue
        losses = np.asarray(run["losses"])
        point["variants"][name] = {
            "step_s": statistics.median(run["times"]), "steps_s": run["times"],
            # the median of the per-round ratios: each pairs two steps taken seconds apart
            "ratio": statistics.median(t / t0 for t, t0 in zip(run["times"], base["times"])),
            "compile_s": run["compile_s"], "losses": run["losses"], "library_calls": run["library_calls"],
            "max_loss_diff": float(np.max(np.abs(losses - np.asarray(base["losses"]))))}
    jax.clear_caches()
    return point


def to_markdown(results: dict) -> str:
    lines = [f"# XLA:CPU options on the train step ({results['cpu']}, jax {results['jax']})", "",
             "`python -m benchmarks.xla_flags` (benchmarks/xla_flags.py): the Trainer's jitted step at our default "
             f"settings, batch {BATCH} x {SEQ_LEN} tokens, float32, each variant compiled with other XLA options "
             "and timed interleaved with the default in one process (one step of each per round, the step before "
             "the rounds untimed); step s: the median over the rounds; ratio: the median over rounds of variant / "
             "default in that round (< 1: faster). Loss diff: the largest |loss - default's| over all the steps, "
             "from the same initial state on the same batches (0: bit-identical).", ""]
    for point in results["points"]:
        lines += [f"## {point['family']} d {point['d_model']}, {point['n_layers']} layers, "
                  f"{point['microbatches']} microbatch(es), {point['rounds']} rounds; 1-min load average "
                  f"{point['load_min']:.1f}-{point['load_max']:.1f}", "",
                  "| variant | step s | ratio | loss diff | ynn / xnn / onednn calls | compile s |",
                  "|---|---|---|---|---|---|"]
        for name, v in point["variants"].items():
            if "error" in v:
                lines.append(f"| {name} | failed: {v['error']} | | | | |")
                continue
            calls = " / ".join(str(v["library_calls"][k]) for k in ("__ynn_fusion", "__xnn_fusion", "onednn"))
            lines.append(f"| {name} | {v['step_s']:.3f} | {v['ratio']:.2f} | {v['max_loss_diff']:.2g} | {calls} "
                         f"| {v['compile_s']:.0f} |")
        lines.append("")
    if results.get("notes"):  # what was measured beside this module's run (written into the JSON by hand)
        lines += ["## Notes", "", *(f"- {note}" for note in results["notes"]), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="transformer:256,transformer:512,lstm:256,lstm:512")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names from VARIANTS (default: all)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="cpu_xla_flags")
    args = parser.parse_args(argv)
    names = ["default"] + [n for n in args.variants.split(",") if n and n != "default"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
    results = {"quick": False, "jax": jax.__version__, "cpu": f"{host_platform.machine()}, {os.cpu_count()} CPUs",
               "points": []}
    with tempfile.TemporaryDirectory(prefix="lmu_jax_xla_flags_") as tmp:
        for shape in args.shapes.split(","):
            family, d_model = shape.split(":")
            point = compare(family, int(d_model), {n: VARIANTS[n] for n in names}, args.rounds, tmp)
            results["points"].append(point)
            print(json.dumps({n: round(v.get("ratio", -1), 3) for n, v in point["variants"].items()}), flush=True)
            for path in write_json_and_markdown(args.out, args.name, results, to_markdown(results)):
                print(path, flush=True)


if __name__ == "__main__":
    main()

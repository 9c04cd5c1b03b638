"""Speed and memory benchmarks; each writes a JSON file and a markdown table to benchmarks/results/.

    suite.py       `lmu-jax bench` (lmu_jax/bench.py): ceiling, train-step MFU per family, whole loop,
                   sequence-length scaling, sharding overhead, and the LMU kernels below -> <platform>.json/.md
    lmu_memory.py  every LMU memory kernel forward + backward, and what impl="auto" picks
                   (python -m benchmarks.lmu_memory) -> lmu_memory_<platform>.json/.md
    xla_flags.py   XLA:CPU compiler options against the default on the train step, interleaved in one process
                   (python -m benchmarks.xla_flags) -> cpu_xla_flags.json/.md
    step_profile.py  where the train step's time goes, per dot shape, from a jax.profiler trace
                   (python -m benchmarks.step_profile) -> cpu_step_profile.json/.md
"""

from __future__ import annotations

import json
from pathlib import Path


def write_json_and_markdown(out_dir: Path, name: str, results: dict, markdown: str) -> tuple[Path, Path]:
    """<out_dir>/<name>[_quick].json (the results) and .md (the table); quick runs never overwrite full ones."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{name}{'_quick' if results['quick'] else ''}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path

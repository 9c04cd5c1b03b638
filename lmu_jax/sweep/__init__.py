"""Sweeps: a spec (spec.py) expands into runs at matched FLOPs, run one process each (runner.py),
collected into one table (collect.py); `lmu-jax sweep` (commands.py) and `lmu-jax demo` (demo.py)."""

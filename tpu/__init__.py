"""Launching lmu_jax on Cloud TPU VMs and pods: slices, babysitting, sweeps across slices.

Standard library only; every gcloud call goes through one runner (``tpu/runner.py``) so dry runs and
tests see exactly what would run. Start with ``python -m tpu.launch --help`` and tpu/README.md.
"""

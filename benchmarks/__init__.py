"""Speed and memory benchmarks; each module writes JSON + a markdown table to benchmarks/results/."""

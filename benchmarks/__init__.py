"""Measurements, not training entry points: `python -m benchmarks.bench` (one step, ours against HF PEFT),
`benchmarks.scaling` (ZeRO-3, 2 ranks against 1) and `benchmarks.quality` (every method side by side)."""

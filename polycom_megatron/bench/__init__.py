"""Benchmarks: layer and model throughput (throughput.py), FLOP counts (flops.py), kernel timings."""

"""The benchmark's measurements, one module per family; experiments/benchmarks/bench.py is the
command line."""

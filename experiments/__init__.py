"""Training harness: config, data, fit(), tracking and checkpoints shared by run.py, sweeps and benchmarks."""

"""Training: rows to model inputs, the per-worker loop and its telemetry, the driver's TorchTrainer
run, the three-stage recipe, preference optimization."""

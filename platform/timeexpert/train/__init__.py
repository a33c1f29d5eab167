"""Training: the per-worker loop, the three-stage recipe, preference optimization."""

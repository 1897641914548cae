"""Training: mesh and sharding, state, steps, the loop, checkpoints, evaluation, CLI."""

"""Training: optimiser and schedule, checkpoints, logging and the loop."""

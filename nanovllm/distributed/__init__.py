"""Tensor parallelism: the group (parallel_state), rank 0's commands to the workers (commands), and the
worker processes themselves (worker)."""

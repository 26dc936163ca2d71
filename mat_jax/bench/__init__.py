"""Benchmarks: each suite times mat_jax against a reference implementation in the same process."""

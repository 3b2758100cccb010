"""Benchmarks: one script per hot path plus end to end (see README.md)."""

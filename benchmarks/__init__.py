"""Kisse load and memory benchmarks, each against a bare-Tornado baseline (`python -m benchmarks`)."""

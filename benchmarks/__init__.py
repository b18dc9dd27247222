"""Benchmarks and training behind ``phasestream bench`` and ``phasestream train``; not part of the runtime."""

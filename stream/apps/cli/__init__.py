"""The ``phasestream`` command line: one module per command group."""

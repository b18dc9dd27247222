"""The ``phasestream`` command line: one module per command group."""

import os

# bitshuffle's OpenMP threads spin while they wait: without this, compressing a frame in the emitter took
# 1.7-7 ms instead of 0.2 ms beside busy stages. OpenMP reads it when bitshuffle is first imported, which the
# command modules do, so it is set here, before any of them is.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

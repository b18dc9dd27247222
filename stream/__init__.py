"""phasestream: live phase retrieval for coherent X-ray imaging beamlines."""

__version__ = "0.1.0"

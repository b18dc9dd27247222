"""Simulated samples, probes, scans, photon noise and detector emitters."""

"""Detector wire formats and data files, both directions.

Stream V2, the position channel, TPX3, CXI, NXmx, result and probe files. NumPy, h5py and cbor2 only.
"""

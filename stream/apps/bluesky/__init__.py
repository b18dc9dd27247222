"""Bluesky: the positions bridge and the Tiled writer for a RunEngine beside the pipeline."""

"""Replay a recorded scan file through the live pipeline."""

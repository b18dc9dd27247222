"""Training of the shipped network weights."""

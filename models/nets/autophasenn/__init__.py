"""AutoPhaseNN: the network, its weights, fitting patterns to its input, and inference."""

"""Neural networks: AutoPhaseNN, DnCNN with spectral normalisation, deep image priors."""

"""Pure compute: forward operators, solvers, networks and quality figures. No ZeroMQ, no Tiled."""

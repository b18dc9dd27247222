"""The launcher: starts stage workers, hears their control socket, owns the run directory."""

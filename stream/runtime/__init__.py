"""Runtime core: messages, the Stage base, transport, configuration, metrics, accounting, Tiled publishing."""

"""Single-shot CDI: HIO/ER phasing, support, LoDIP and Double-DIP."""

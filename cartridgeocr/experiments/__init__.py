"""The logic behind the experiment commands: composing configs (and, later, sweeps and searches)."""

"""Checkpoints: their format, reading them back verified, and writing them on a cadence."""

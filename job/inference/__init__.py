"""Trained models from a run folder, and what they make: codes, generated videos, predicted frames."""

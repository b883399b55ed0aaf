"""How good a trained run is: frame metrics, the probe, generation and prediction scores, goals, the report."""

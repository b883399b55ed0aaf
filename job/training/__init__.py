"""Training: the loop that tells the story of a run, the state it keeps, and the task (the
model being trained) that it drives."""

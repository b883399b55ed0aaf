"""A resumable training job for a MAGVIT-style video tokenizer."""

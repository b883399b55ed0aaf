"""The models: the video tokenizer, the masked token transformer, and MaskGIT's schedule and decoding."""

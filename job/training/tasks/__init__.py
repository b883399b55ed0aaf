"""One task per stage: its model, the loss of a batch, its validation and its picture."""

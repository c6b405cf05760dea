"""Training on one node: the model, the data, inner steps (`Trainer`), the NoLoCo outer step, checkpoint files."""

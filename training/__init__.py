"""Bert4XMR training: data loading, splits, the model, checkpoints and evaluation."""

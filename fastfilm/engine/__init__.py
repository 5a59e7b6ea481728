"""How a model is executed, whatever model it is: the fast path's options resolved for the
machine, compilation, batching and padding, the training step, inference, the trainer and
data-parallel processes (docs/architecture.md)."""

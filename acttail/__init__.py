"""ActTail: per-projection activation sparsity allocated from weight-spectrum heavy tails."""

__version__ = "0.1.0"

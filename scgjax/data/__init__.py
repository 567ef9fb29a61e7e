"""Data sets for scgjax examples and benchmarks."""

from scgjax.data.mnist import MNIST, dynamic_binarize, load_mnist

__all__ = ["MNIST", "dynamic_binarize", "load_mnist"]

"""fqtbench: a benchmark suite for fully-quantized training on shared integer backends."""

__version__ = "0.1.0"

"""Fast backends (blocked CPU, torch CUDA) behind the probe functions."""

"""qvl-batch: offline batch inference for Qwen2.5-VL on Ray."""

__version__ = "0.1.0"

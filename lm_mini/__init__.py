"""lm_mini: efficient LLaVA-Mini-style multimodal models on PyTorch Lightning."""
__version__ = "0.1.0"

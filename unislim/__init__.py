"""unislim: compress unified multimodal transformers."""

__version__ = "0.1.0"

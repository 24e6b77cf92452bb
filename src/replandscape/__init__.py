"""replandscape: the representation landscape of few-shot learning and fine-tuning in LLMs."""

__version__ = "0.1.0"

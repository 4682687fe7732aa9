"""vqa-async: a micro-batching server for ModelScope's mPLUG visual question answering model."""

__version__ = "0.1.0"

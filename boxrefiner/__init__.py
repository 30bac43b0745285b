"""Train a box-refinement head on frozen HQ-SAM image embeddings, fast (feature cache, sampling, AMP)."""

__version__ = "0.4.0"

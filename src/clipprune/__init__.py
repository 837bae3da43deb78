"""clipprune: post-training pruning of CLIP models (library; no DVC knowledge)."""

__version__ = "0.1.0"

"""Mask R-CNN with any timm backbone, trained through HuggingFace Accelerate."""

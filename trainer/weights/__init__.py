"""Detector weights: reading other formats, class-aware transfer, the class list beside weights."""

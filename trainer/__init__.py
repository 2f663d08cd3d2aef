"""Mask R-CNN with any timm backbone: training (``trainer/run.py``), evaluation, prediction,
and :class:`Detector` for using a trained model from Python."""

__all__ = ["Detector"]


def __getattr__(name: str):
    # Imported on first use: the command-line tools import this package and answer --help
    # without loading torch.
    if name == "Detector":
        from trainer.detector import Detector

        return Detector
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")

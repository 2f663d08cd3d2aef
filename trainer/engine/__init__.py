"""Training: ``train_detector`` (train.py) runs the workflow loop (runner.py) with the
optimizer and schedule (optim.py), the run's state (state.py) and checkpoints
(checkpoint.py), the val phase (val_phase.py), logs (logging.py) and trackers (trackers.py)."""

from trainer.engine.accelerator import build_accelerator
from trainer.engine.runner import NonFiniteLossError
from trainer.engine.train import train_detector

__all__ = ["NonFiniteLossError", "build_accelerator", "train_detector"]

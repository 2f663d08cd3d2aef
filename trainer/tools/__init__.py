"""Command-line tools, run as ``python -m trainer.tools.NAME``: ``browse_dataset``,
``plot_metrics``, ``analyze_model``."""

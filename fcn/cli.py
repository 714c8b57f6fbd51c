"""Command-line glue: readable errors instead of tracebacks, and exit codes."""

from __future__ import annotations

import logging
import sys


def run_training(config, workdir: str) -> int:
    """Train, turning the errors a user can act on into one message and exit code 1."""
    from fcn.checkpoint import CheckpointError
    from fcn.config import ConfigError
    from fcn.data.images import DataError
    from fcn.train import TrainingError, train_and_evaluate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("absl", "jax", "orbax", "tensorstore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        train_and_evaluate(config, workdir)
    except (ConfigError, DataError, CheckpointError, TrainingError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

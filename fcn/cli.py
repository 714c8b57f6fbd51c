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


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.", required=True)
    config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
    flags.mark_flags_as_required(["config"])


def train_main(argv=None) -> None:
    """`python train.py --config FILE --workdir DIR [--config.key=value ...]`."""
    from absl import app, flags

    _define_flags()

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        try:
            config = flags.FLAGS.config
            config.keys()  # the config file is loaded lazily: surface its errors here
        except OSError as e:  # a missing file, or an exception inside the config file
            print(f"error: {e}", file=sys.stderr)
            return 2
        return run_training(config, flags.FLAGS.workdir)

    app.run(main, argv=argv, flags_parser=_parse_flags)


def _parse_flags(argv):
    """absl flag parsing, with config key errors as one line instead of a traceback."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        # ml_collections raises these for an unknown --config.key, naming the closest valid key.
        msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
        print(f"error: unknown config key in the command line: {msg}", file=sys.stderr)
        sys.exit(2)
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

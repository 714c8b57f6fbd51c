"""Train a U-Net FCN from a config file.

    python train.py --config configs/camvid_cpu.py --workdir runs/camvid_cpu \
        [--config.optimizer.learning_rate=1e-3 ...]

Re-running the same command on an existing workdir resumes it. The config
file is Python and is executed: name only config files you trust.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.", required=True)
config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).", lock_config=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)
    from fcn.cli import run_training

    return run_training(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    sys.exit(app.run(main))

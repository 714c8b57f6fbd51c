r"""Train a U-Net FCN from a config file.

    python train.py --config configs/camvid_cpu.py --workdir runs/camvid_cpu \
        [--config.optimizer.learning_rate=1e-3 ...]

Re-running the same command on an existing workdir resumes it. The config
file is Python and is executed: name only config files you trust.
"""

from fcn.cli import train_main

if __name__ == "__main__":
    train_main()

"""Oxford-IIIT Pet (pet / background / border) through tensorflow-datasets.

    pip install -e '.[tfds]'
    python train.py --config configs/pets.py --workdir runs/pets

TFDS downloads the dataset on first use (about 800 MB) into ~/tensorflow_datasets,
or reads it from --config.data.path=DIR. Images are shrunk to at most 256 px
on the longer side at load time; evaluation scores at the labels' own size (README,
"Every score ..."). Measured: not yet.
"""

from fcn.config import default_config


def get_config():
    c = default_config()
    c.data.source = "tfds"
    c.data.tfds_name = "oxford_iiit_pet"
    c.data.max_size = 256
    c.augment.crop_size = (192, 192)
    c.augment.scale_range = (0.75, 1.25)
    c.model.features = 16
    c.batch_size = 16
    c.num_steps = 4000
    c.eval_every = 1000
    c.eval_batch_size = 8
    c.checkpoint_every = 500
    return c

"""The defaults every config starts from; each field is documented in fcn/config.py.

Not meant to be trained as is: the configs next to it override a few fields.
"""

from fcn.config import default_config


def get_config():
    return default_config()

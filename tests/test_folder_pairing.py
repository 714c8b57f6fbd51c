"""The folder source's pairing of images with masks, and its held-out val split (more: test_data_sources.py)."""

import unicodedata
from pathlib import Path

from fcn.data.folder import hold_out


def _pairs(stems):
    return [(Path(f"images/{s}.jpg"), Path(f"masks/{s}.png")) for s in stems]


def test_held_out_val_is_the_same_for_names_in_either_unicode_form():
    """The same folder with its names stored decomposed (NFD: zipped on macOS) and composed (NFC: the same
    files from git) holds out the same val images. It hashed the stem as stored, so an evaluation on the
    other copy scored images the model had trained on, and left val images out of it."""
    stems = ["caf\u00e9", "na\u00efve", "\u00e9t\u00e9", "se\u00f1or", "M\u00fcller", "gar\u00e7on", "b", "c", "d", "e"]
    for fraction in (0.3, 0.5):
        composed, decomposed = (
            {unicodedata.normalize("NFC", image.stem) for image, _ in hold_out(_pairs(names), fraction)[1]}
            for names in (stems, [unicodedata.normalize("NFD", s) for s in stems])
        )
        assert len(composed) == round(fraction * len(stems))
        assert composed == decomposed

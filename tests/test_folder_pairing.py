"""The folder source's pairing of images with masks, and its held-out val split (more: test_data_sources.py)."""

import unicodedata
from pathlib import Path

import numpy as np
import pytest

from fcn.data import DataError
from fcn.data.folder import hold_out
from tests.test_data_sources import folder, make_folder, rgb, save


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


@pytest.mark.parametrize("suffix", ["_mask", "_L"])
def test_masks_named_with_a_suffix_are_named_with_what_to_rename(tmp_path, suffix):
    """Masks saved as `a_mask.png` (CamVid's raw release: `a_L.png`) for `a.jpg`: the error listed the images
    as having no mask, and not the masks beside them, nor why none paired."""
    for i in range(3):
        save(tmp_path / "images" / f"im{i:02d}.jpg", rgb(i))
        save(tmp_path / "masks" / f"im{i:02d}{suffix}.png", np.zeros((6, 8), np.uint8))
    with pytest.raises(DataError) as e:
        folder(tmp_path)
    message = str(e.value)
    assert "3 image(s) with no mask of the same stem" in message and "im00, im01, im02" in message
    assert f"3 mask(s) with no image of the same stem in {tmp_path / 'images'}: im00{suffix}, " in message
    assert f"the masks' stems are the images' with {suffix!r} added" in message
    assert f"rename im00{suffix}.png to im00.png" in message


def test_unpaired_files_on_both_sides_are_all_named(tmp_path):
    """An image without its mask and a mask without its image (a typo, a renamed file): only the first was named."""
    make_folder(tmp_path, n=3)
    (tmp_path / "masks" / "im01.png").rename(tmp_path / "masks" / "im1.png")
    with pytest.raises(DataError, match=r"images: 1 image\(s\) with no mask .*: im01; and .*masks.*: im1$"):
        folder(tmp_path)

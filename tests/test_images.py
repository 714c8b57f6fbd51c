"""Reading images and masks: modes, validation, and errors that name the file."""

import logging
import struct
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fcn.data import images
from fcn.data.base import decode_all
from fcn.data.folder import pair_examples
from fcn.data.images import (
    DataError,
    fit_max_size,
    fitted_size,
    read_image,
    read_mask,
    read_size,
    rescale_pair,
    scaled_size,
)
from fcn.data.labels import check_labels_config, map_labels, normalize_color_map, normalize_value_map


def save(path, array, mode=None, **kwargs):
    Image.fromarray(np.asarray(array), mode=mode).save(path, **kwargs)
    return path


def rgb(h=6, w=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- images ---------------------------------------------------------------


def test_read_image_rgb_exact(tmp_path):
    img = rgb()
    out = read_image(save(tmp_path / "a.png", img))
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, img)


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8)
    out = read_image(save(tmp_path / "g.png", gray))
    assert out.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_and_palette_images_become_rgb(tmp_path, mode):
    img = Image.fromarray(rgb()).convert(mode)
    img.save(tmp_path / "x.png")
    out = read_image(tmp_path / "x.png")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(img.convert("RGB")))


def test_16_bit_image_is_refused_naming_file_and_mode(tmp_path):
    path = save(tmp_path / "deep.png", np.full((4, 4), 4000, np.uint16))
    with pytest.raises(DataError, match=r"deep\.png.*I;16"):
        read_image(path)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_truncated_file_is_caught_by_full_decode(tmp_path, fmt):
    path = save(tmp_path / f"t.{fmt}", rgb(64, 64), format=fmt.upper())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"t\.{fmt}: corrupt or truncated"):
        read_image(path)


def test_not_an_image_and_missing_file(tmp_path):
    (tmp_path / "notes.png").write_text("hello, not a PNG")
    with pytest.raises(DataError, match=r"notes\.png: not an image"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(DataError, match=r"nope\.png: cannot read"):
        read_image(tmp_path / "nope.png")


def test_an_image_over_pillows_decompression_bomb_limit_is_refused_naming_it(tmp_path, monkeypatch):
    """docs/reliability.md: an image too large to decode safely is refused with its file name, from
    its header (read_size, where a split is streamed) and when decoded (images and masks alike)."""
    path = save(tmp_path / "huge.png", np.zeros((20, 20), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses above twice this: 400 > 200
    for read in (read_image, lambda p: read_mask(p, num_classes=2), read_size):
        with pytest.raises(DataError, match=r"huge\.png: image too large to decode safely") as e:
            read(path)
        assert "shrink it or cut it into smaller images" in str(e.value)  # what to do: it said only why


def test_an_image_in_pillows_warning_band_is_logged_naming_it_once(tmp_path, monkeypatch, caplog):
    """Between Image.MAX_IMAGE_PIXELS and twice it Pillow only warns, without the file's name (and once per
    size, so the second file of a size was not even warned of): fcn logs each such file, once, and reads it."""
    monkeypatch.setattr(images, "_warned_large", set(), raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 20 x 20 = 400: over it, under 600
    values = np.eye(20, dtype=np.uint8)
    paths = [save(tmp_path / name, values) for name in ("big.png", "big2.png")]
    small = save(tmp_path / "small.png", values[:10])  # 200 pixels: not warned of
    with caplog.at_level(logging.WARNING), pytest.warns(Image.DecompressionBombWarning):  # Pillow's: as before
        for path in paths:
            assert read_size(path) == (20, 20)
            np.testing.assert_array_equal(read_mask(path, num_classes=2), values)
            np.testing.assert_array_equal(read_image(path)[..., 0], values)
        read_image(small)
    for name in ("big.png", "big2.png"):
        line = f"{tmp_path / name}: image of 20x20 (HxW), 400 pixels, over PIL.Image.MAX_IMAGE_PIXELS (300)"
        assert caplog.text.count(line) == 1, caplog.text
    assert "small.png" not in caplog.text


# --- masks ----------------------------------------------------------------


def test_grayscale_and_palette_masks_are_raw_indices(tmp_path):
    values = np.array([[0, 1, 2], [2, 255, 0]], np.uint8)
    np.testing.assert_array_equal(read_mask(save(tmp_path / "l.png", values), num_classes=3), values)
    pal = Image.fromarray(values, mode="L").convert("P")
    pal.putpalette([(i * 7) % 256 for i in range(768)])  # colours must not matter
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", num_classes=3), values)


def test_binary_0_255_mask_gives_the_specific_error_with_the_fix(tmp_path):
    path = save(tmp_path / "bin.png", np.array([[0, 255], [255, 0]], np.uint8))
    with pytest.raises(DataError) as e:
        read_mask(path, num_classes=2)
    msg = str(e.value)
    assert "bin.png" in msg and "only 0 and 255" in msg and "2 classes" in msg
    assert """--config.data.value_map='{"255": 1}'""" in msg


@pytest.mark.parametrize("value_map", [ml_collections.ConfigDict({"255": 1}), {"255": 1}, {255: 1}])
def test_value_map_fixes_binary_masks(tmp_path, value_map):
    path = save(tmp_path / "bin.png", np.array([[0, 255], [255, 0]], np.uint8))
    out = read_mask(path, num_classes=2, value_map=value_map)
    np.testing.assert_array_equal(out, [[0, 1], [1, 0]])


def test_out_of_range_labels_name_file_and_values(tmp_path):
    path = save(tmp_path / "m.png", np.array([[0, 1, 7], [9, 255, 2]], np.uint8))
    with pytest.raises(DataError, match=r"m\.png: label values 7, 9 are neither"):
        read_mask(path, num_classes=3)
    # One past the last class id is no class id either: read as is, it was counted nowhere, silently.
    path = save(tmp_path / "k.png", np.array([[0, 1, 2], [3, 255, 2]], np.uint8))
    with pytest.raises(DataError, match=r"k\.png: label values 3 are neither class ids \(0\.\.2\)"):
        read_mask(path, num_classes=3)


def test_rgb_mask_without_color_map_says_colour_coded_and_shows_fix(tmp_path):
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[:2] = (128, 0, 0)
    path = save(tmp_path / "c.png", mask)
    with pytest.raises(DataError, match="colour-coded") as e:
        read_mask(path, num_classes=2)
    assert "c.png" in str(e.value) and "--config.data.color_map=" in str(e.value)


def test_rgb_mask_with_color_map(tmp_path):
    mask = np.zeros((4, 4, 3), np.uint8)
    mask[:2] = (128, 0, 0)
    mask[3, 3] = (0, 0, 255)
    path = save(tmp_path / "c.png", mask)
    colors = ((0, 0, 0), (128, 0, 0), (0, 0, 255))
    out = read_mask(path, num_classes=3, color_map=colors)
    expected = np.zeros((4, 4), np.uint8)
    expected[:2], expected[3, 3] = 1, 2
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(DataError, match=r"c\.png: 1 pixels have colours not in .*255"):
        read_mask(path, num_classes=2, color_map=colors[:2])


def test_grayscale_mask_saved_as_rgb_is_accepted(tmp_path):
    values = np.array([[0, 1], [2, 1]], np.uint8)
    path = save(tmp_path / "g.png", np.repeat(values[..., None], 3, -1))
    np.testing.assert_array_equal(read_mask(path, num_classes=3), values)


@pytest.mark.parametrize("bits", [2, 4])
def test_low_bit_depth_grayscale_png_masks_are_raw_values(tmp_path, bits):
    # PIL scales 2- and 4-bit grayscale samples to 0..255 (brightness); a mask's sample is its class id.
    values = np.arange(2**bits, dtype=np.uint8).reshape(2, -1)
    path = save(tmp_path / "m.png", values, bits=bits)
    np.testing.assert_array_equal(read_mask(path, num_classes=2**bits), values)


def test_16_bit_colour_mask_is_refused_not_truncated(tmp_path):
    # PIL keeps only the high byte of 16-bit RGB samples: class ids 0..2 would all read as 0.
    values = np.array([[0, 1], [2, 1]], ">u2")
    rows = b"".join(b"\0" + np.repeat(values[y, :, None], 3, -1).tobytes() for y in range(2))
    ihdr = struct.pack(">IIBBBBB", 2, 2, 16, 2, 0, 0, 0)  # 16-bit RGB
    path = tmp_path / "rgb16.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    )
    with pytest.raises(DataError, match=r"rgb16\.png: 16-bit colour mask"):
        read_mask(path, num_classes=3)


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_palette_mask_with_color_map_is_read_by_colour(tmp_path):
    # A colour mask saved as a palette PNG (as PNG optimisers do) has palette indices in any order.
    colors = ((0, 0, 0), (128, 0, 0), (0, 0, 255))
    classes = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    pal = Image.fromarray(2 - classes, mode="P")  # palette index 2 - k holds class k's colour
    pal.putpalette([c for k in (2, 1, 0) for c in colors[k]])
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png", num_classes=3, color_map=colors), classes)


def test_color_map_colours_past_the_classes_are_mapped_by_value_map(tmp_path):
    mask = np.zeros((2, 3, 3), np.uint8)
    mask[0, 0], mask[1, 2] = (128, 0, 0), (224, 224, 192)  # class 1, and a void colour
    path = save(tmp_path / "c.png", mask)
    with pytest.raises(DataError, match=r"c\.png: 1 pixels have colours not in data.color_map, e.g. \(224, 224, 192\)"):
        read_mask(path, num_classes=2, color_map=((0, 0, 0), (128, 0, 0)))
    colors = ((0, 0, 0), (128, 0, 0), (224, 224, 192))
    out = read_mask(path, num_classes=2, color_map=colors, value_map={"2": 255})
    np.testing.assert_array_equal(out, [[1, 0, 0], [0, 0, 255]])
    with pytest.raises(DataError, match=r"data.color_map has 3 colours for 2 classes.*value_map does not map 2"):
        check_labels_config(2, 255, {}, normalize_color_map(colors, 2))
    with pytest.raises(DataError, match=r"data.color_map has 1 colours but there are 2 classes"):
        normalize_color_map(colors[:1], 2)


def test_16_bit_mask_maps_through_value_map(tmp_path):
    path = save(tmp_path / "w.png", np.array([[0, 1], [1000, 1]], np.uint16))
    out = read_mask(path, num_classes=2, value_map={"1000": 255})
    np.testing.assert_array_equal(out, [[0, 1], [255, 1]])


def test_map_labels_and_config_checks():
    raw = np.array([[11, 0], [3, 11]], np.uint8)
    out = map_labels(raw, name="x", num_classes=11, value_map={11: 255})
    np.testing.assert_array_equal(out, [[255, 0], [3, 255]])
    with pytest.raises(ValueError, match="data.value_map entry 'sky'"):
        normalize_value_map({"sky": 1})
    with pytest.raises(ValueError, match="maps 3 to 9"):
        check_labels_config(2, 255, {3: 9})
    with pytest.raises(ValueError, match="ignore_label=1"):
        check_labels_config(3, 1, {})
    # At the edges: raw value 0 maps too (background to ignore); the last class id is no ignore
    # label and no value_map target past the classes is taken; the first value past them is.
    out = map_labels(np.array([[0, 1], [2, 0]], np.uint8), name="x", num_classes=3, value_map={0: 255})
    np.testing.assert_array_equal(out, [[255, 1], [2, 255]])
    with pytest.raises(ValueError, match="ignore_label=2 must be in 3..255"):
        check_labels_config(3, 2, {})
    with pytest.raises(ValueError, match="maps 3 to 2, which is neither a class id"):
        check_labels_config(2, 255, {3: 2})
    check_labels_config(3, 3, {7: 2, 8: 3})


# --- pairs ----------------------------------------------------------------


def test_decode_pairs_size_mismatch_names_both_files_and_sizes(tmp_path):
    image = save(tmp_path / "a.png", rgb(6, 8))
    mask = save(tmp_path / "a_mask.png", np.zeros((5, 8), np.uint8))
    with pytest.raises(DataError) as e:
        decode_all(pair_examples([(image, mask)], num_classes=2), workers=2)
    msg = str(e.value)
    assert "a.png" in msg and "6x8" in msg and "a_mask.png" in msg and "5x8" in msg


def test_decode_pairs_keeps_order_and_skip_bad_counts(tmp_path, caplog):
    pairs = []
    for i in range(5):
        label = np.full((6, 8), i % 2, np.uint8)
        pairs.append(
            (
                save(tmp_path / f"{i}.png", rgb(seed=i)),
                save(tmp_path / f"{i}m.png", label),
            )
        )
    pairs[1][0].write_bytes(b"")  # bad image
    save(pairs[3][1], np.full((6, 8), 9, np.uint8))  # bad labels
    with pytest.raises(DataError, match=r"1\.png: empty file"):
        decode_all(pair_examples(pairs, num_classes=2), workers=2)
    with caplog.at_level(logging.WARNING):
        split = decode_all(pair_examples(pairs, num_classes=2), workers=2, skip_bad=True)
    assert list(split.names) == ["0", "2", "4"]
    np.testing.assert_array_equal(split.images[1], rgb(seed=2))
    assert "skipped 2 of 5 pairs" in caplog.text


@pytest.mark.parametrize("h, w", [(45, 61), (7, 5), (1, 9), (100, 37)])
def test_rescale_pair_keeps_each_label_on_its_image_pixel(h, w):
    """Images whose red and green are their own row and column, labels their row, column, or a
    two-value checkerboard: after `input_scale`'s or `data.max_size`'s resize each label is the
    source pixel under the new pixel's centre (nearest; a tie may go either way), within a pixel of
    where the image says it is (antialiasing pulls edge pixels inward), and no value is invented."""
    r, c = np.mgrid[:h, :w].astype(np.uint8)
    image = np.stack([r, c, np.zeros_like(r)], -1)
    checker = ((r + c) % 2 * 200).astype(np.uint8)
    for scale in [0.77, 0.5, 0.3]:
        hs, ws = scaled_size(h, w, scale)
        (im, rows), (_, cols), (_, check) = (rescale_pair(image, lab, scale) for lab in (r, c, checker))
        assert im.shape == (hs, ws, 3) and rows.shape == cols.shape == check.shape == (hs, ws)
        centre_r = ((np.arange(hs) + 0.5) * h / hs - 0.5)[:, None]
        centre_c = ((np.arange(ws) + 0.5) * w / ws - 0.5)[None, :]
        assert np.abs(rows - centre_r).max() <= 0.5 + 1e-6 and np.abs(cols - centre_c).max() <= 0.5 + 1e-6
        assert np.abs(im[..., 0].astype(int) - rows).max() <= 1 and np.abs(im[..., 1].astype(int) - cols).max() <= 1
        np.testing.assert_array_equal(check, (rows.astype(int) + cols) % 2 * 200)
    image_fit, rows_fit = fit_max_size(image, r, 20)
    assert rows_fit.shape == image_fit.shape[:2] == fitted_size(h, w, 20) and max(rows_fit.shape) == min(20, max(h, w))


def test_an_exif_orientation_the_sizes_cannot_reveal_is_warned_once(tmp_path, monkeypatch, caplog):
    """Turned 180 degrees: a mask drawn as a viewer shows the image has the same size as one in stored
    order, so only a warning can tell the user that fcn reads pixels as stored."""
    monkeypatch.setattr(images, "_warned_orientation", False, raising=False)
    exif = Image.Exif()
    exif[0x0112] = 3
    array = np.zeros((6, 8, 3), np.uint8)
    for name, tags in (("plain.png", {}), ("turned.png", {"exif": exif}), ("turned2.png", {"exif": exif})):
        Image.fromarray(array).save(tmp_path / name, **tags)
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "mask.png")
    images.read_pair(tmp_path / "plain.png", tmp_path / "mask.png", num_classes=2)
    assert "EXIF" not in caplog.text
    for name in ("turned.png", "turned2.png"):
        image, label = images.read_pair(tmp_path / name, tmp_path / "mask.png", num_classes=2)
        assert image.shape == (6, 8, 3) and label.shape == (6, 8)  # read as stored, not turned
    assert caplog.text.count("EXIF orientation 3") == 1 and "turned.png has EXIF orientation 3" in caplog.text


def test_a_jpeg_mask_is_refused_whatever_its_name(tmp_path):
    # JPEG's lossy compression smears class ids at edges (values stay in range, so nothing else
    # catches it); a folder source lists no .jpg masks, but a JPEG saved as .png was read silently.
    values = np.zeros((16, 16), np.uint8)
    values[4:12, 4:12] = 2
    path = save(tmp_path / "m.png", values, format="JPEG", quality=75)
    with pytest.raises(DataError, match=r"m\.png: mask stored as JPEG"):
        read_mask(path, num_classes=3)
    read_image(path)  # as an image, JPEG is fine
    tiff = tmp_path / "m.tif"  # JPEG-coded strips in a TIFF smear alike: ids 1, 3 and 4 appear (44 of 256 pixels
    Image.fromarray(values).save(tiff, compression="jpeg")  # wrong), which 5 classes took silently
    with pytest.raises(DataError, match=r"m\.tif: mask stored as JPEG \(in a TIFF\)"):
        read_mask(tiff, num_classes=5)
    Image.fromarray(values).save(tiff, compression="tiff_lzw")  # lossless TIFF compression: read as before
    np.testing.assert_array_equal(read_mask(tiff, num_classes=3), values)


def test_a_lossy_webp_mask_is_refused_and_a_lossless_one_reads(tmp_path):
    # Saved lossy (Pillow's default, quality 75), this 4-class mask of raw ids came back with 1043 of 4096
    # pixels wrong, all still class ids: read silently. Pillow does not say which coding a WebP has.
    values = np.zeros((64, 64), np.uint8)
    values[8:40, 8:40], values[24:56, 30:60], values[50:, :20] = 1, 2, 3
    with_alpha = np.dstack([values] * 3 + [np.full_like(values, 200)])  # 'VP8X' + 'ALPH' + 'VP8 ' chunks
    frames = {"save_all": True, "append_images": [Image.fromarray(values * 60)]}  # "ANMF" chunks
    for name, array, kwargs in (("m.png", values, {}), ("alpha.webp", with_alpha, {}), ("anim.webp", values, frames)):
        path = save(tmp_path / name, array, format="WEBP", **kwargs)
        assert (read_image(path)[..., 0] != values).any()  # lossy indeed; as an image, it reads
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: mask stored as lossy WebP, whose lossy"):
            read_mask(path, num_classes=4)
    for name, kwargs in (("ok.webp", {}), ("ok_anim.webp", frames)):  # lossless ('VP8L'), also as animation frames
        path = save(tmp_path / name, values, format="WEBP", lossless=True, **kwargs)
        np.testing.assert_array_equal(read_mask(path, num_classes=4), values)


def test_16_bit_colour_image_is_read_by_its_high_byte_and_a_multi_frame_file_by_its_first_frame(tmp_path):
    """The module docstring's rules for two files it did not mention (pinned: they read so before)."""
    values = np.array([[0, 1000, 40000], [65535, 256, 300]], ">u2")
    rows = b"".join(b"\0" + np.repeat(values[y, :, None], 3, -1).tobytes() for y in range(2))
    ihdr = struct.pack(">IIBBBBB", 3, 2, 16, 2, 0, 0, 0)  # 16-bit RGB
    path = tmp_path / "rgb16.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    )
    np.testing.assert_array_equal(read_image(path)[..., 0], values >> 8)
    first, second = np.full((4, 6), 1, np.uint8), np.full((4, 6), 2, np.uint8)
    for name in ("pages.tif", "anim.png", "anim.gif"):
        Image.fromarray(first).save(tmp_path / name, save_all=True, append_images=[Image.fromarray(second)])
        np.testing.assert_array_equal(read_image(tmp_path / name), np.full((4, 6, 3), 1, np.uint8))
        if name != "anim.gif":  # (PIL's GIF writer renumbers the palette: a GIF mask's values are not these)
            np.testing.assert_array_equal(read_mask(tmp_path / name, num_classes=3), first)

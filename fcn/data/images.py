"""Reading images and label masks from files, with checks that name the file.

Policies, decided once here for every file-based source:

- Images come back as uint8 [H, W, 3]. Grayscale ('L', '1') is replicated to
  three channels; 'RGBA', 'LA', 'P', 'CMYK' and other 8-bit modes are converted
  to RGB by PIL (alpha is dropped, not composited). 16- and 32-bit grayscale
  images ('I;16', 'I', 'F') are refused with an error: PIL would clip them at
  255, and scaling them to 8 bits needs a range only the user knows (12-bit
  sensors, HDR), so we do not guess. 16-bit colour images (RGB or RGBA PNG and
  TIFF) are read as PIL reads them: each sample's high byte, the full 0..65535
  range scaled to 0..255. A file of several frames (TIFF pages, an animated GIF,
  PNG or WebP) gives its first frame, for images and masks alike.
- No EXIF rotation is applied: masks are stored in raw pixel order, and rotating
  only the image would misalign the pair. A mask drawn as a viewer shows the image
  is caught when a quarter turn swaps the sizes (the error says so); other
  orientations (180 degrees, mirrored, square images) cannot be told from a
  correct pair, so the first image with an orientation tag is warned about.
- Masks: 'L' and 'P' PNGs are raw values (for 'P', the palette index is the
  value, as in PASCAL VOC; for 2- and 4-bit grayscale, the stored sample, not
  PIL's 0..255 brightness); '1' gives 0/1; 16-bit masks are read as integers
  and must map into range. A mask stored as JPEG (lossy: class ids smear at
  edges) is refused, whatever its file's name, and so are a JPEG-compressed TIFF
  and a lossy WebP (a 'VP8 ' bitstream; lossless WebP, 'VP8L', reads). JPEG 2000
  and AVIF masks are read as decoded: no cheap check tells a lossy one from a
  lossless one (a reversible JPEG 2000 cut to a quality target is lossy too).
  An RGB mask needs `color_map` unless all its
  channels are equal (a grayscale mask saved as RGB). 16-bit colour masks are
  refused (PIL keeps only their high byte).
- With `color_map`, RGB and palette ('P') masks are read by colour (a colour
  mask saved as a palette PNG, as PNG optimisers do, has its indices in any
  order): colour i of the list gives value i. Colours past the class count
  (void, borders) give values K, K+1, ... that `value_map` must map.
- `value_map` (raw value -> class id) is applied first; unmapped values keep
  their value; every resulting value must be a class id or the ignore label.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fcn.data.base import IGNORE_LABEL, DataError
from fcn.data.labels import map_labels, normalize_color_map

logger = logging.getLogger(__name__)
PathLike = str | Path
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
# Grayscale samples of 2 and 4 bits, which PIL scales to 0..255: the factor that undoes it.
_LOW_BIT_GRAY = {"L;2": 85, "L;4": 17}


def _open_loaded(path: PathLike) -> Image.Image:
    """Opens and fully decodes an image, turning every failure into a DataError."""
    return _decode(path)[0]


def _decode(path: PathLike) -> tuple[Image.Image, str, str]:
    """`_open_loaded`, with how the file stores its samples (PIL's raw mode, e.g. 'L;4'), which
    decoding forgets, and the lossy coding it was stored with ('JPEG', ...; '' if none is known)."""
    path = Path(path)
    try:
        # Read first, decode second: an I/O failure (permissions, a vanished
        # file) is then not mistaken for a corrupt image.
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
    if not data:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        rawmode = img.tile[0][3] if img.tile else ""
        img.load()  # decode every byte now, so truncation is caught here
    except Image.UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image format PIL can read") from e
    except Image.DecompressionBombError as e:
        raise too_large_error(path, e) from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt or truncated image ({e})") from e
    warn_if_large(path, img.size)
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode  # TIFF: (rawmode, ...)
    return img, rawmode if isinstance(rawmode, str) else "", _lossy_coding(img, data)


def _lossy_coding(img: Image.Image, data: bytes) -> str:
    """The lossy coding a decoded file was stored with, as a mask's error names it ('' if none is known)."""
    if img.format in ("JPEG", "MPO"):
        return "JPEG"
    if img.format == "TIFF" and img.info.get("compression") == "jpeg":
        return "JPEG (in a TIFF)"
    if img.format == "WEBP" and _webp_bitstream(data) == b"VP8 ":
        return "lossy WebP"
    return ""


def _webp_bitstream(data: bytes) -> bytes:
    """The chunk coding a WebP file's first frame: b'VP8 ' (lossy) or b'VP8L' (lossless), which PIL does not
    tell; found by walking the RIFF chunks (into the first animation frame, ANMF, past its 16-byte header)."""
    pos = 12  # past 'RIFF', the size and 'WEBP'
    while pos + 8 <= len(data):
        kind, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        if kind in (b"VP8 ", b"VP8L"):
            return kind
        pos += 8 + (16 if kind == b"ANMF" else size + (size & 1))
    return b""


def too_large_error(path: PathLike, e: Exception) -> DataError:
    """Pillow's decompression-bomb refusal (over 2 * Image.MAX_IMAGE_PIXELS), with what to do."""
    return DataError(
        f"{path}: image too large to decode safely ({str(e).rstrip('.')}); shrink it or cut it into smaller images "
        "(or, from Python, raise PIL.Image.MAX_IMAGE_PIXELS for files you trust)"
    )


_warned_large: set[str] = set()


def warn_if_large(name: PathLike, size_wh: tuple[int, int]) -> None:
    """Logs, once per file, an image in Pillow's warning band (over Image.MAX_IMAGE_PIXELS, up to twice it,
    where Pillow refuses): Pillow's DecompressionBombWarning names no file, and is shown once per size."""
    pixels, limit = max(1, size_wh[0]) * max(1, size_wh[1]), Image.MAX_IMAGE_PIXELS  # as Pillow counts
    if not limit or pixels <= limit or str(name) in _warned_large:
        return
    _warned_large.add(str(name))
    logger.warning(
        "%s: image of %dx%d (HxW), %d pixels, over PIL.Image.MAX_IMAGE_PIXELS (%d), so Pillow warns of a possible "
        "decompression bomb (DecompressionBombWarning, without the file's name); fcn reads it as it is (Pillow "
        "refuses over twice the limit)",
        name,
        size_wh[1],
        size_wh[0],
        pixels,
        limit,
    )


def read_size(path: PathLike) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as img:
            w, h = img.size
    except Image.UnidentifiedImageError as e:
        raise DataError(f"{path}: not an image format PIL can read") from e
    except Image.DecompressionBombError as e:
        raise too_large_error(path, e) from e
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror or e})") from e
    except (SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{path}: corrupt image header ({e})") from e
    warn_if_large(path, (w, h))
    return h, w


def as_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """Checks a decoded image array and returns it as uint8 [H, W, 3]."""
    if array.dtype != np.uint8:
        raise DataError(f"{name}: image has dtype {array.dtype}, expected uint8")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4) or 0 in array.shape:
        raise DataError(f"{name}: image has shape {array.shape}, expected [H, W, 3]")
    return np.ascontiguousarray(array[..., :3])


def read_image(path: PathLike) -> np.ndarray:
    """Reads an image file as uint8 [H, W, 3] (see the module docstring for modes)."""
    with _open_loaded(path) as img:
        return pil_rgb(img, str(path))


def pil_rgb(img: Image.Image, name: str) -> np.ndarray:
    """A PIL image as uint8 [H, W, 3], by the module docstring's rules; `name` for errors."""
    try:
        img.load()  # an image from Image.open decodes here: a truncated file fails as read_image's does
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"{name}: corrupt or truncated image ({e})") from e
    except AssertionError as e:  # PIL's check that the file is still open
        raise DataError(f"{name}: its file was closed before it was decoded; pass the path, or load() it first") from e
    if img.mode in _HIGH_BIT_MODES:
        raise DataError(
            f"{name}: {img.mode} image (more than 8 bits per channel); fcn reads "
            "8-bit images: convert it to 8-bit RGB or grayscale first"
        )
    if img.mode not in ("RGB", "L"):
        try:
            img = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise DataError(f"{name}: cannot convert mode {img.mode} to RGB") from e
    return as_rgb(np.asarray(img), name)


def _mask_values(img: Image.Image, rawmode: str, path: PathLike, color_map: np.ndarray | None, ignore: int):
    """Raw per-pixel integer values of a decoded mask, before any value_map; `ignore`: the ignore label."""
    if ";16" in rawmode and img.mode in ("RGB", "RGBA"):
        raise DataError(
            f"{path}: 16-bit colour mask; PIL reads only the high byte of each sample, which would change "
            "its values: save it as 8-bit RGB, or as a grayscale or palette PNG of class ids"
        )
    if color_map is not None and img.mode in ("P", "PA", "RGB", "RGBA"):
        return _colors_to_ids(np.asarray(img.convert("RGB")), path, color_map, ignore)
    if img.mode == "L" and rawmode in _LOW_BIT_GRAY:
        return np.asarray(img) // _LOW_BIT_GRAY[rawmode]
    if img.mode in ("L", "P"):
        return np.asarray(img)
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8)
    if img.mode in ("LA", "PA"):
        return np.asarray(img.getchannel(0))
    if img.mode in _HIGH_BIT_MODES and img.mode != "F":
        return np.asarray(img).astype(np.int64)
    if img.mode not in ("RGB", "RGBA"):
        raise DataError(f"{path}: mask has mode {img.mode}; expected 8-bit 'L', 'P' or RGB")
    return gray_rgb_mask(np.asarray(img)[..., :3], path)


def gray_rgb_mask(rgb: np.ndarray, path: PathLike) -> np.ndarray:
    """The values of an RGB mask [H, W, 3] read without color_map: one channel if all are equal, else an error."""
    if (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all():
        return rgb[..., 0]  # a grayscale mask saved as RGB
    colors, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
    common = [tuple(int(v) for v in c) for c in colors[np.argsort(-counts)][:3]]
    example = ", ".join(str(c) for c in common)
    raise DataError(
        f"{path}: RGB mask with {len(colors)} distinct colours (most common: {example}); "
        "it looks colour-coded. Give the colour of each class, in class-id order: "
        f"--config.data.color_map='({example}, ...)'"
    )


def _colors_to_ids(rgb: np.ndarray, path: PathLike, color_map: np.ndarray, ignore: int) -> np.ndarray:
    """Maps each pixel's colour to the index of that colour in color_map (values K, K+1, ... past
    the class count, for value_map to map)."""
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    known = (color_map[:, 0] << 16) | (color_map[:, 1] << 8) | color_map[:, 2]
    order = np.argsort(known)
    pos = np.clip(np.searchsorted(known[order], codes), 0, len(known) - 1)
    found = known[order][pos] == codes
    if not found.all():
        bad = [int(c) for c in np.unique(codes[~found])[:5]]
        listed = ", ".join(str(((c >> 16) & 255, (c >> 8) & 255, c & 255)) for c in bad)
        n = len(color_map)
        raise DataError(
            f"{path}: {int((~found).sum())} pixels have colours not in data.color_map, "
            f"e.g. {listed}; add them to data.color_map after the class colours: the first one added "
            f"is read as value {n}, for data.value_map to map, e.g. to the ignore label: "
            f"""--config.data.value_map='{{"{n}": {ignore}}}'"""
        )
    return order[pos].astype(np.uint8)


def read_mask(
    path: PathLike,
    *,
    num_classes: int,
    ignore_label: int = IGNORE_LABEL,
    value_map: Mapping | None = None,
    color_map: Sequence | np.ndarray | None = None,
) -> np.ndarray:
    """Reads a label mask file as uint8 [H, W] class ids (or the ignore label)."""
    colors = None if color_map is None else normalize_color_map(color_map, num_classes)
    img, rawmode, lossy = _decode(path)
    with img:
        if lossy:  # whatever the file's name (folder sources list no .jpg or .webp masks)
            raise DataError(
                f"{path}: mask stored as {lossy}, whose lossy compression changes class ids at region edges; "
                "save masks losslessly, as PNG"
            )
        raw = _mask_values(img, rawmode, path, colors, ignore_label)
    if raw.ndim != 2:
        raise DataError(f"{path}: mask has shape {raw.shape}, expected [H, W]")
    return map_labels(
        raw,
        name=str(path),
        num_classes=num_classes,
        ignore_label=ignore_label,
        value_map=value_map,
    )


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """(H, W) after resizing by `scale`, as `rescale_pair` resizes."""
    return max(1, round(h * scale)), max(1, round(w * scale))


def fitted_size(h: int, w: int, max_size: int) -> tuple[int, int]:
    """(H, W) after `fit_max_size`."""
    if not max_size or max(h, w) <= max_size:
        return h, w
    return scaled_size(h, w, max_size / max(h, w))


def fit_max_size(image: np.ndarray, label: np.ndarray, max_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Shrinks a pair so its longer side is at most max_size (0 = keep); labels nearest."""
    h, w = label.shape
    if not max_size or max(h, w) <= max_size:
        return image, label
    return rescale_pair(image, label, max_size / max(h, w))


def fit_image(image: np.ndarray, max_size: int) -> np.ndarray:
    """The image of `fit_max_size`'s pair, alone (uint8 [H, W, 3])."""
    h, w = fitted_size(*image.shape[:2], max_size)
    return image if (h, w) == image.shape[:2] else _resize_image(image, (w, h))


def _resize_image(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize(size_wh, Image.Resampling.BILINEAR))


def rescale_pair(image: np.ndarray, label: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Resizes a pair by `scale`: antialiased bilinear image, nearest-neighbour label."""
    h, w = label.shape
    size = scaled_size(h, w, scale)[::-1]  # PIL wants (W, H)
    if size == (w, h):
        return image, label
    image = _resize_image(image, size)
    # Nearest neighbour: interpolating class ids would invent classes at edges.
    label = np.asarray(Image.fromarray(label).resize(size, Image.Resampling.NEAREST))
    return image, label


def _check_same_size(image_path: PathLike, image_hw, mask_path: PathLike, mask_hw) -> None:
    if tuple(image_hw) != tuple(mask_hw):
        (ih, iw), (mh, mw) = image_hw, mask_hw
        hint, turn = "", _exif_orientation(image_path) if (ih, iw) == (mw, mh) else 1
        if turn in (5, 6, 7, 8):  # a mask drawn on the image as a viewer shows it, turned a quarter
            hint = (
                f"; the image has EXIF orientation {turn} (shown turned 90 degrees), which fcn has not applied: "
                "it reads pixels as stored, so the mask must be in the image's stored orientation"
            )
        raise DataError(f"size mismatch: image {image_path} is {ih}x{iw} (HxW) but mask {mask_path} is {mh}x{mw}{hint}")


def _exif_orientation(path: PathLike) -> int:
    """The EXIF orientation tag of an image file (1, upright, when it has none or cannot be read)."""
    try:
        with Image.open(path) as img:
            return _orientation(img)
    except (OSError, ValueError, SyntaxError, EOFError, TypeError):
        return 1


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1 when it has none or it cannot be read)."""
    try:
        return int(img.getexif().get(0x0112, 1))
    except (OSError, ValueError, SyntaxError, EOFError, TypeError):
        return 1


_warned_orientation = False


def _warn_orientation(image_path: PathLike, turn: int) -> None:
    """Warns, once per process, of an image whose EXIF orientation tag fcn does not apply."""
    global _warned_orientation
    if turn == 1 or _warned_orientation:
        return
    _warned_orientation = True
    logger.warning(
        "%s has EXIF orientation %d (a viewer shows it turned or mirrored), which fcn does not apply: its "
        "mask, and those of any other such image, must be in the pixel orientation stored in the file, not "
        "as a viewer shows it (warned once)",
        image_path,
        turn,
    )


def read_pair(
    image_path: PathLike, mask_path: PathLike, *, max_size: int = 0, **mask_kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """Reads an (image, mask) pair and checks that their sizes agree."""
    with _open_loaded(image_path) as img:
        turn = _orientation(img)
        image = pil_rgb(img, str(image_path))
    label = read_mask(mask_path, **mask_kwargs)
    _check_same_size(image_path, image.shape[:2], mask_path, label.shape)
    _warn_orientation(image_path, turn)
    return fit_max_size(image, label, max_size)


def pair_size(image_path: PathLike, mask_path: PathLike, *, max_size: int = 0) -> tuple[int, int]:
    """(H, W) that `read_pair` gives, from the two files' headers; sizes that differ are an error."""
    image_hw, mask_hw = read_size(image_path), read_size(mask_path)
    _check_same_size(image_path, image_hw, mask_path, mask_hw)
    return fitted_size(*image_hw, max_size)

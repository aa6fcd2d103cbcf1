"""Image loading that survives real-world photo collections.

Every decoded image goes through one geometry: the shorter side is resized to
``pre.resize`` (antialiased), then ``pre.size`` squares are cut (centre, three
along the long side, or five-crop), then normalised with ``pre.mean/std``.
Index build and query both call :func:`load_tensor`, so they see the same pixels.

Two resamplers implement that geometry:

* tensor path, for plain RGB/greyscale JPEGs of moderate size: simplejpeg's
  libjpeg-turbo decodes straight into a numpy array (the same pixels as
  Pillow's libjpeg-turbo, for all 671 Im2GPS3k-dev photos, without Pillow's
  decode buffer and copy: 0.9 ms of a warm query on the 2-core machine; data
  it refuses is decoded by Pillow, which names the error), the EXIF orientation
  is applied as a numpy view, and the whole image is resized as a uint8 tensor with torch's antialiased
  ``interpolate`` (the kernel ``torchvision.transforms.v2.functional.resize``
  calls), then cropped. Until issue 15 this path decoded with
  ``torchvision.io.decode_jpeg``; importing torchvision cost 1.7 s of every cold
  ``geo query``. ``benchmarks/bench_decode.py`` checks the two give identical
  tensors (all 667 such Im2GPS3k-dev photos: not one value differs) and times
  them.
* box path, for everything else (PNG, CMYK, 16-bit, palettes, huge aspect
  ratios, large JPEGs), decoded by Pillow. It resizes only the crop boxes (``Image.resize(box=...)``,
  which reads the pixels around a box exactly as a full resize would) and uses
  JPEG DCT-domain downscaling (``Image.draft``) for photos at least twice the
  needed size: a 4000x3000 JPEG takes 54 ms this way against 116 ms through a
  full decode and resize.

Pillow's guards stay on: ``LOAD_TRUNCATED_IMAGES`` is never set, and the
decompression-bomb check (``Image.MAX_IMAGE_PIXELS``) runs on the header before
either decoder touches the pixels.
"""
from __future__ import annotations

import glob
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from geo.core.files import FileRefused, on_disk, printable, read_capped

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".avif")

# The tensor path resizes the whole image; past this aspect ratio the box path,
# which only resamples the crop boxes, is cheaper and bounded in memory.
_FAST_MAX_ASPECT = 4.0
# JPEGs whose shorter side is at least this multiple of ``pre.resize`` are read
# with DCT downscaling (PIL draft), much cheaper than a full-size decode.
_DRAFT_FACTOR = 2


class ImageLoadError(Exception):
    """An input that cannot be turned into pixels; ``reason`` is short and human."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = printable(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class Preprocess:
    """Everything needed to turn a decoded image into the model's input (a backbone's, recorded in its spec)."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not (isinstance(self.size, int) and isinstance(self.resize, int) and 0 < self.size <= self.resize):
            raise ValueError(f"Preprocess needs integers 0 < size <= resize, got size={self.size!r} resize={self.resize!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"Preprocess needs 3 means and 3 positive stds, got {self.mean!r}, {self.std!r}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"Preprocess interpolation must be 'bicubic' or 'bilinear', not {self.interpolation!r}")

    def to_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        try:
            return cls(size=int(d["size"]), resize=int(d["resize"]), mean=tuple(float(x) for x in d["mean"]),
                       std=tuple(float(x) for x in d["std"]), interpolation=str(d.get("interpolation", "bicubic")))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a preprocess dict ({e!r}): {d!r}") from None


# ---------------------------------------------------------------- opening
def read_image_file(path: str | os.PathLike) -> bytes:
    """Read the file once, through :func:`geo.core.files.read_capped` (regular files only, size-capped: a FIFO
    or ``/dev/zero`` is refused, not read); every failure becomes an ImageLoadError with a plain reason."""
    if os.path.isdir(on_disk(path)):
        raise ImageLoadError(path, "a directory with no image files in it")
    try:
        data = read_capped(on_disk(path))
    except FileRefused as e:
        raise ImageLoadError(path, e.reason) from None
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return data


def _open_header(path: str | os.PathLike, data: bytes) -> Image.Image:
    """Identify the format and size without decoding pixels, with the bomb guard as an error.

    Pillow only *warns* between 1x and 2x ``MAX_IMAGE_PIXELS``; the warning is
    made an error here (process-local filter; DataLoader workers are processes).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(path, f"decompression bomb guard: {e}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image (unrecognised format)") from None
    except Exception as e:  # decoders raise many types on corrupt headers
        raise ImageLoadError(path, f"corrupt image header ({type(e).__name__}: {e})") from None


def _load_pixels(path: str | os.PathLike, im: Image.Image) -> None:
    try:
        im.load()
    except OSError as e:
        if "truncated" in str(e):
            raise ImageLoadError(path, f"truncated image ({e})") from None
        raise ImageLoadError(path, f"corrupt image data ({e})") from None
    except Exception as e:
        raise ImageLoadError(path, f"corrupt image data ({type(e).__name__}: {e})") from None


def _exif_transpose(im: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block is common and must not cost the photo."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white, 16-bit is scaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I") or mode == "F":  # I;16, I;16B, I;16L, I (often 16-bit PNG/TIFF), F
        arr = np.asarray(im, dtype=np.float64)
        top = 255.0 if arr.size and arr.max() <= 255 else 65535.0
        grey = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any supported image to an upright 8-bit RGB PIL image, or raise ImageLoadError."""
    return decode_rgb(read_image_file(path), path)


def decode_rgb(data: bytes, path: str | os.PathLike) -> Image.Image:
    """:func:`open_rgb` for bytes already in memory; ``path`` only names it in errors."""
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return _decode_pil(path, _open_header(path, data))


def _decode_pil(path: str | os.PathLike, im: Image.Image, draft_to: tuple[int, int] | None = None) -> Image.Image:
    if draft_to is not None and im.format == "JPEG":
        im.draft(im.mode, draft_to)
    _load_pixels(path, im)
    try:
        return _to_rgb(_exif_transpose(im))
    except Exception as e:
        raise ImageLoadError(path, f"cannot convert {im.mode} image to RGB ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------- geometry
def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resize`` (torchvision's rounding: long side truncated)."""
    if width <= height:
        return resize, max(resize, int(resize * height / width))
    return max(resize, int(resize * width / height)), resize


def crop_offsets(width: int, height: int, size: int, crops: int) -> list[tuple[int, int]]:
    """(left, top) of each ``size`` square inside a ``width`` x ``height`` (already resized) image.

    crops=1: centre (torchvision ``center_crop`` rounding). crops=3: start,
    centre and end of the long side, centred on the short side (Müller-Budack
    et al. 2018). crops=5: four corners then centre (torchvision ``five_crop``,
    as GeoEstimation's PyTorch release evaluates).
    """
    cx, cy = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    if crops == 1:
        return [(cx, cy)]
    if crops == 3:
        if width >= height:
            return [(0, cy), (cx, cy), (width - size, cy)]
        return [(cx, 0), (cx, cy), (cx, height - size)]
    if crops == 5:
        r, b = width - size, height - size
        return [(0, 0), (r, 0), (0, b), (r, b), (cx, cy)]
    raise ValueError(f"crops must be 1, 3 or 5, not {crops!r}")


def _normalise(u8: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 [n,3,s,s] -> float32 normalised."""
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (u8.float().div_(255.0) - mean).div_(std)


def _pil_resample(pre: Preprocess) -> Image.Resampling:
    return {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}[pre.interpolation]


def _tensor_from_pil(rgb: Image.Image, full_size: tuple[int, int], pre: Preprocess, crops: int) -> torch.Tensor:
    """Resample each crop box straight from the decoded image.

    ``full_size`` is the upright size before any draft downscale, so crop
    boxes are placed exactly where the tensor path places them.
    """
    rw, rh = resized_size(*full_size, pre.resize)
    sx, sy = rgb.width / rw, rgb.height / rh
    out = []
    for left, top in crop_offsets(rw, rh, pre.size, crops):
        box = (left * sx, top * sy, (left + pre.size) * sx, (top + pre.size) * sy)
        out.append(np.asarray(rgb.resize((pre.size, pre.size), _pil_resample(pre), box=box)))
    return _normalise(torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2), pre)


def _tensor_resized(pixels: np.ndarray, pre: Preprocess, crops: int) -> torch.Tensor:
    """Resize the whole upright image (contiguous uint8 [height, width, 3]) as a uint8 tensor (antialiased),
    then cut the crops.

    The pixels stay in the decoder's channels-last layout; the batch stride is
    set so torch sees a channels-last tensor and resizes it in place of
    repacking it first (as torchvision does; 1.2 ms instead of 3.6 ms per photo here).
    """
    hwc = torch.from_numpy(pixels)
    h, w, c = hwc.shape
    img = hwc.as_strided((1, c, h, w), (h * w * c, 1, w * c, c))
    rw, rh = resized_size(w, h, pre.resize)
    img = torch.nn.functional.interpolate(img, size=[rh, rw], mode=pre.interpolation, align_corners=False,
                                          antialias=True)[0]
    s = pre.size
    return _normalise(torch.stack([img[:, t:t + s, l:l + s] for l, t in crop_offsets(rw, rh, s, crops)]), pre)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1: upright); a broken EXIF block is common and must not cost the photo."""
    try:
        return int(im.getexif().get(0x0112, 1))
    except Exception:
        return 1


def _upright_size(im: Image.Image) -> tuple[int, int]:
    """Header size with EXIF orientations 5-8 (90/270 degree turns) swapped."""
    return (im.height, im.width) if _orientation(im) in (5, 6, 7, 8) else im.size


# EXIF orientation -> the view of [height, width, channels] pixels that ``ImageOps.exif_transpose`` gives
_UPRIGHT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
            7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def _jpeg_upright(data: bytes, im: Image.Image) -> np.ndarray | None:
    """Upright uint8 [height, width, 3] pixels of an RGB or greyscale JPEG, or None where libjpeg-turbo refuses
    the data (a truncated or damaged file: Pillow decodes it then, and names the error as for any other)."""
    try:
        hwc = simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        return None
    turn = _UPRIGHT.get(_orientation(im))
    return hwc if turn is None else np.ascontiguousarray(turn(hwc))


# A photo whose short side is under this many pixels holds too little to place it: it is answered (upscaled like
# any other) but `geo query` says so, rather than answer a 16x12 thumbnail without a word.
SMALL_SIDE = 64


def small_image(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image file whose short side is under :data:`SMALL_SIDE` pixels, else None (also when
    its header cannot be read: the answer already says why). Reads the header only."""
    try:
        with Image.open(on_disk(path)) as im:
            size = _upright_size(im)
    except Exception:  # any decoder's error on a header: not this check's to report
        return None
    return size if min(size) < SMALL_SIDE else None


def load_tensor(path: str | os.PathLike, pre: Preprocess, crops: int = 1) -> torch.Tensor:
    """float32 normalised [crops, 3, size, size] for one image file, or ImageLoadError."""
    return decode_tensor(read_image_file(path), path, pre, crops)


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from the header alone, with the bomb guard: what a server checks before decoding."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _open_header(name, data).size


def decode_tensor(data: bytes, path: str | os.PathLike, pre: Preprocess, crops: int = 1) -> torch.Tensor:
    """:func:`load_tensor` for bytes already in memory (an upload); ``path`` only names it in errors."""
    if crops not in (1, 3, 5):
        raise ValueError(f"crops must be 1, 3 or 5, not {crops!r}")
    if not data:
        raise ImageLoadError(path, "empty file (0 bytes)")
    im = _open_header(path, data)
    w, h = im.size
    short, long_ = min(w, h), max(w, h)
    if im.format == "JPEG" and im.mode in ("RGB", "L") and long_ <= _FAST_MAX_ASPECT * short \
            and short < _DRAFT_FACTOR * pre.resize:
        pixels = _jpeg_upright(data, im)
        if pixels is None:
            pixels = np.array(_decode_pil(path, im))
        return _tensor_resized(pixels, pre, crops)
    full = _upright_size(im)
    draft_to = None
    if short >= _DRAFT_FACTOR * pre.resize:  # keep the shorter side >= pre.resize after DCT scaling
        draft_to = (-(-w * pre.resize // short), -(-h * pre.resize // short))
    rgb = _decode_pil(path, im, draft_to)
    return _tensor_from_pil(rgb, full, pre, crops)


# ---------------------------------------------------------------- datasets
class ImageDataset(torch.utils.data.Dataset):
    """Paths -> (index, tensor [crops,3,s,s] or None, reason or None); a bad image never raises."""

    def __init__(self, paths: list[str], pre: Preprocess, crops: int = 1):
        if crops not in (1, 3, 5):
            raise ValueError(f"crops must be 1, 3 or 5, not {crops!r}")
        self.paths = list(paths)
        self.pre = pre
        self.crops = crops

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, load_tensor(self.paths[i], self.pre, self.crops), None
        except ImageLoadError as e:
            return i, None, e.reason
        except Exception as e:  # a decoder bug must cost one image, not the whole build
            return i, None, f"unexpected {type(e).__name__}: {e}"


def collate_skip_errors(batch: list[tuple[int, Any, Any]]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    """DataLoader collate for :class:`ImageDataset`: (ok indices, tensor, [(index, reason)]).

    The tensor is [n,3,s,s] when every item has one crop and [n,crops,3,s,s]
    otherwise (flatten the first two dims to embed, then pool per image); None
    when every image in the batch failed.
    """
    ok = [(i, t) for i, t, _ in batch if t is not None]
    errors = [(i, r) for i, t, r in batch if t is None]
    if not ok:
        return [], None, errors
    x = torch.stack([t for _, t in ok])
    if x.shape[1] == 1:
        x = x[:, 0]
    return [i for i, _ in ok], x, errors


# ---------------------------------------------------------------- command-line arguments
def expand_images(args: list[str] | str) -> list[str]:
    """Paths, globs and directories -> image files, in order; a directory yields its images recursively (sorted).

    Arguments that match nothing (a missing file, an empty glob, a folder without
    images) are kept as given, so the caller reports each as a per-image error
    instead of losing it silently. Names come back :func:`~geo.core.files.printable`
    (a name that is not UTF-8 shows its bytes escaped; :func:`read_image_file` still opens it).
    """
    if isinstance(args, (str, os.PathLike)):
        args = [str(args)]
    out: list[str] = []
    for a in args:
        path = on_disk(a)
        if os.path.isdir(path):  # a folder with no image stays, so its answer says so instead of vanishing
            found = sorted(str(f) for f in Path(path).rglob("*")
                           if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
            out.extend(found or [a])
        elif glob.has_magic(a) and not os.path.exists(path):  # the name first: a plain path costs one stat, not two
            matches = sorted(glob.glob(a, recursive=True))
            out.extend(matches if matches else [a])
        else:
            out.append(a)
    return [printable(x) for x in out]

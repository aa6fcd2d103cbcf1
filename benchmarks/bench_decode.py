"""geo's image decoding against the torchvision decoder it replaced (issue 15, item 7).

Until issue 15 moderate-size RGB/greyscale JPEGs were decoded with
``torchvision.io.decode_jpeg`` and resized with torchvision; geo now decodes them
with Pillow and resizes with torch alone, so ``geo query`` no longer imports
torchvision. Bundles built before must keep answering the same, so the two have
to give the same tensors. This script checks that on every photo of the given
folders that takes that path (plus each one turned by an EXIF orientation tag
and converted to greyscale, for the first few), and times both on one thread.

    python benchmarks/bench_decode.py /work/shared/data/im2gps3k-dev/images
"""
from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from geo.data.images import crop_offsets, decode_tensor, resized_size
from geo.data.images import Preprocess

PRE = Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


def torchvision_tensor(data: bytes, pre: Preprocess) -> torch.Tensor:
    """The removed decoder, verbatim: libjpeg-turbo via torchvision, antialiased uint8 resize, centre crop."""
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                      apply_exif_orientation=True)
    h, w = img.shape[-2:]
    rw, rh = resized_size(w, h, pre.resize)
    img = TF.resize(img, [rh, rw], interpolation=InterpolationMode.BICUBIC, antialias=True)
    (left, top), = crop_offsets(rw, rh, pre.size, 1)
    x = img[None, :, top:top + pre.size, left:left + pre.size].float().div_(255.0)
    return (x - 0.5) / 0.5


def takes_tensor_path(data: bytes) -> bool:
    im = Image.open(io.BytesIO(data))
    return im.format == "JPEG" and im.mode in ("RGB", "L") and max(im.size) <= 4 * min(im.size) \
        and min(im.size) < 2 * PRE.resize


def variants(data: bytes) -> list[bytes]:
    """The photo, EXIF-rotated (orientation 6) and greyscale: the cases the two decoders handle differently."""
    im = Image.open(io.BytesIO(data))
    out = []
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif)
    out.append(buf.getvalue())
    buf = io.BytesIO()
    im.convert("L").save(buf, "JPEG", quality=90)
    out.append(buf.getvalue())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--variants", type=int, default=20, help="photos also checked rotated and greyscale")
    args = ap.parse_args()
    torch.set_num_threads(1)
    blobs = [p.read_bytes() for f in args.folders for p in sorted(Path(f).glob("*.jpg"))]
    blobs = [b for b in blobs if takes_tensor_path(b)]
    extra = [v for b in blobs[:args.variants] for v in variants(b)]
    worst, differing = 0.0, 0
    for data in blobs + extra:
        a, b = torchvision_tensor(data, PRE), decode_tensor(data, "x.jpg", PRE)
        d = (a - b).abs().max().item() * 127.5  # in 8-bit levels
        worst, differing = max(worst, d), differing + (d > 0)
    print(f"{len(blobs)} photos + {len(extra)} rotated/greyscale variants; {differing} differ; "
          f"largest difference {worst:.3f} of 255 levels")
    for name, fn in (("torchvision (before)", torchvision_tensor), ("geo (after)", lambda d, p: decode_tensor(d, "x", p))):
        times = []
        for _ in range(3):
            t = time.process_time()
            for data in blobs:
                fn(data, PRE)
            times.append((time.process_time() - t) / len(blobs) * 1000)
        print(f"{name:22s} CPU ms per photo, best of 3: {min(times):.2f}  (runs {' '.join(f'{x:.2f}' for x in times)})")
    print(f"load average: {' '.join(f'{x:.2f}' for x in np.round(__import__('os').getloadavg(), 2))}")


if __name__ == "__main__":
    main()

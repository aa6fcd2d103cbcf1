from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from geo.data.images import (
    ImageDataset,
    ImageLoadError,
    _decode_pil,
    _tensor_resized,
    _tensor_from_pil,
    _upright_size,
    collate_skip_errors,
    crop_offsets,
    load_tensor,
    open_rgb,
    resized_size,
)
from geo.data.images import Preprocess

PRE = Preprocess(size=64, resize=72, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _reason(path) -> str:
    with pytest.raises(ImageLoadError) as ei:
        open_rgb(path)
    assert str(ei.value) == f"{path}: {ei.value.reason}"
    # the dataset reports the same input as an error row instead of raising
    _, tensor, reason = ImageDataset([str(path)], PRE)[0]
    assert tensor is None and reason
    return ei.value.reason


# ---------------------------------------------------------------- inputs that must fail cleanly
def test_truncated_jpeg_is_an_error_not_half_grey(make_image, tmp_path):
    data = open(make_image("a.jpg", 640, 480, quality=95), "rb").read()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    assert "truncated" in _reason(bad)
    with pytest.raises(ImageLoadError, match="truncated"):
        load_tensor(bad, PRE)


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    assert "empty" in _reason(p)


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("not a photo\n")
    assert "not an image" in _reason(p)


def test_missing_file(tmp_path):
    assert _reason(tmp_path / "nope.jpg") == "file not found"


def test_directory(tmp_path):
    d = tmp_path / "dir.jpg"
    d.mkdir()
    assert "directory" in _reason(d)


def test_unreadable_file(make_image, monkeypatch):
    path = make_image("locked.jpg")
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root reads anything: simulate the OS refusal instead
            real = os.open

            def deny(p, *args, **kwargs):
                if str(p) == path:
                    raise PermissionError(13, "Permission denied", path)
                return real(p, *args, **kwargs)

            monkeypatch.setattr(os, "open", deny)
        assert _reason(path) == "permission denied"
    finally:
        os.chmod(path, 0o644)


def test_decompression_bomb_guard_kept(make_image, monkeypatch):
    path = make_image("big.png", 200, 100, format="PNG")
    jpg = make_image("big.jpg", 200, 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15000)  # 20000 px: Pillow's warning band, made an error
    assert "decompression bomb" in _reason(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # past 2x: Pillow's own error
    assert "decompression bomb" in _reason(path)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_tensor(jpg, PRE)  # checked on the header, before any pixel is decoded


# ---------------------------------------------------------------- inputs that must load
def _rgb_ok(path, size=None) -> Image.Image:
    im = open_rgb(path)
    assert im.mode == "RGB"
    if size:
        assert im.size == size
    t = load_tensor(path, PRE)
    assert t.shape == (1, 3, 64, 64) and t.dtype == torch.float32 and torch.isfinite(t).all()
    return im


def test_cmyk_jpeg(tmp_path, textured):
    p = tmp_path / "cmyk.jpg"
    textured(120, 80).convert("CMYK").save(p)
    assert Image.open(p).mode == "CMYK"
    im = _rgb_ok(p, (120, 80))
    ref = np.asarray(textured(120, 80), dtype=np.float32)
    assert np.abs(np.asarray(im, dtype=np.float32) - ref).mean() < 12  # colours survive the round trip


def test_palette_with_transparency_composited_on_white(tmp_path):
    p = tmp_path / "pal.png"
    im = Image.new("P", (40, 30), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.paste(1, (20, 0, 40, 30))
    im.save(p, transparency=0)
    px = np.asarray(_rgb_ok(p, (40, 30)))
    assert tuple(px[5, 5]) == (255, 255, 255) and tuple(px[5, 30]) == (0, 0, 255)


def test_rgba_and_la_composited_on_white(tmp_path):
    rgba = np.zeros((30, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 20:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    px = np.asarray(_rgb_ok(tmp_path / "a.png"))
    assert tuple(px[0, 0]) == (255, 255, 255) and tuple(px[0, 30]) == (200, 0, 0)
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    assert tuple(np.asarray(_rgb_ok(tmp_path / "la.png"))[0, 30]) == (200, 200, 200)


def test_16bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "deep.png"
    arr = np.tile(np.linspace(0, 65535, 50, dtype=np.uint16), (20, 1))
    Image.fromarray(arr).save(p)
    assert Image.open(p).mode.startswith("I")
    px = np.asarray(_rgb_ok(p, (50, 20)))[..., 0]
    assert px[0, 0] == 0 and px[0, -1] == 255 and 120 < px[0, 25] < 136


def test_greyscale_and_1bit(tmp_path, textured):
    textured(50, 40).convert("L").save(tmp_path / "g.jpg")
    px = np.asarray(_rgb_ok(tmp_path / "g.jpg"))
    assert (px[..., 0] == px[..., 1]).all()
    Image.fromarray(np.eye(20, dtype=bool)).save(tmp_path / "b.png")
    assert tuple(np.asarray(_rgb_ok(tmp_path / "b.png"))[3, 3]) == (255, 255, 255)


def test_exif_orientation_applied_on_both_paths(tmp_path, textured):
    p = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees: portrait
    textured(200, 100).save(p, exif=exif, quality=95)
    assert open_rgb(p).size == (100, 200)
    im = Image.open(p)
    slow = _tensor_from_pil(_decode_pil(str(p), im), _upright_size(im), PRE, 3)
    fast = _whole_image_path(p, 3)
    assert (fast - slow).abs().mean() < 0.02  # a wrong rotation would differ by ~0.5


def test_tensor_path_pixels_are_pillows_in_every_orientation(tmp_path, textured):
    """libjpeg-turbo straight into numpy (the tensor path) gives exactly Pillow's upright pixels: all eight EXIF
    orientations, greyscale, and a broken EXIF block (read as upright, as Pillow's transpose leaves it)."""
    cases = {f"o{o}.jpg": (textured(130, 100), o) for o in range(1, 9)} | {"grey.jpg": (textured(100, 131).convert("L"), 6)}
    for name, (im, orientation) in cases.items():
        exif = Image.Exif()
        exif[0x0112] = orientation
        im.save(tmp_path / name, quality=90, exif=exif)
    (tmp_path / "badexif.jpg").write_bytes((tmp_path / "o1.jpg").read_bytes().replace(b"Exif\x00\x00", b"Exif\x00\x00\xff", 1))
    for name in [*cases, "badexif.jpg"]:
        path = tmp_path / name
        assert torch.equal(load_tensor(path, PRE), _whole_image_path(path, 1)), name


def test_truncated_jpeg_on_the_tensor_path_is_named(make_image, tmp_path):
    data = open(make_image("a.jpg", 100, 80, quality=95), "rb").read()  # shorter side under 2 x resize
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated"):
        load_tensor(bad, PRE)


def test_huge_aspect_ratio(tmp_path, textured):
    p = tmp_path / "strip.png"
    textured(6000, 12).save(p)
    for crops in (1, 3, 5):
        assert load_tensor(p, PRE, crops).shape == (crops, 3, 64, 64)


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100)
    assert tuple(np.asarray(_rgb_ok(p))[16, 16]) == (255, 0, 0)


# ---------------------------------------------------------------- geometry, the two resamplers, datasets
def _whole_image_path(path, crops: int):
    """The tensor path (whole image resized as a tensor) forced on any image."""
    return _tensor_resized(np.array(_decode_pil(str(path), Image.open(path))), PRE, crops)


def test_tensor_path_is_exactly_the_torchvision_decoder_it_replaced(tmp_path, textured):
    """Bundles built when moderate JPEGs went through torchvision must answer the same: identical tensors,
    EXIF-rotated and greyscale photos included (benchmarks/bench_decode.py checks the Im2GPS3k photos)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    exif = Image.Exif()
    exif[0x0112] = 6
    # shorter sides under 2 x PRE.resize: larger JPEGs take the DCT-downscaling box path
    cases = {"plain.jpg": (textured(130, 100), {}), "turned.jpg": (textured(130, 100), {"exif": exif}),
             "grey.jpg": (textured(100, 131).convert("L"), {})}
    for name, (im, kw) in cases.items():
        im.save(tmp_path / name, quality=90, **kw)
        data = (tmp_path / name).read_bytes()
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                          apply_exif_orientation=True)
        rw, rh = resized_size(img.shape[2], img.shape[1], PRE.resize)
        img = TF.resize(img, [rh, rw], interpolation=InterpolationMode.BICUBIC, antialias=True)
        (left, top), = crop_offsets(rw, rh, PRE.size, 1)
        ref = (img[None, :, top:top + PRE.size, left:left + PRE.size].float() / 255 - 0.5) / 0.5
        assert torch.equal(load_tensor(tmp_path / name, PRE), ref), name


def test_fast_and_pil_paths_agree(make_image):
    for crops in (1, 3, 5):
        path = make_image("p.jpg", 400, 300, seed=crops, quality=95)
        im = Image.open(path)
        slow = _tensor_from_pil(_decode_pil(path, im), _upright_size(im), PRE, crops)
        fast = _whole_image_path(path, crops)
        assert fast.shape == slow.shape == (crops, 3, 64, 64)
        assert (fast - slow).abs().mean() < 0.01


def test_large_jpeg_draft_close_to_full_decode(make_image):
    path = make_image("large.jpg", 600, 450, quality=95)  # shorter side >= 2 x resize: DCT-downscaled
    draft = load_tensor(path, PRE)
    full = _whole_image_path(path, 1)
    assert (draft - full).abs().mean() < 0.03


def test_crop_geometry():
    assert resized_size(400, 300, 72) == (96, 72) and resized_size(300, 400, 72) == (72, 96)
    assert crop_offsets(96, 72, 64, 1) == [(16, 4)]
    assert crop_offsets(96, 72, 64, 3) == [(0, 4), (16, 4), (32, 4)]
    assert crop_offsets(72, 96, 64, 3) == [(4, 0), (4, 16), (4, 32)]
    assert crop_offsets(96, 72, 64, 5) == [(0, 0), (32, 0), (0, 8), (32, 8), (16, 4)]
    with pytest.raises(ValueError):
        crop_offsets(96, 72, 64, 2)


def test_normalisation_matches_preprocess(tmp_path):
    p = tmp_path / "grey.png"
    Image.new("RGB", (80, 80), (255, 0, 128)).save(p)
    pre = Preprocess(size=64, resize=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    t = load_tensor(p, pre)[0, :, 10, 10]
    want = (torch.tensor([255, 0, 128]) / 255 - torch.tensor(pre.mean)) / torch.tensor(pre.std)
    assert torch.allclose(t, want.float(), atol=1e-5)


def test_dataset_and_collate_skip_errors(make_image, tmp_path):
    good = [make_image(f"{i}.jpg", seed=i) for i in range(3)]
    (tmp_path / "bad.jpg").write_text("x")
    paths = [good[0], str(tmp_path / "bad.jpg"), good[1], str(tmp_path / "gone.jpg"), good[2]]
    loader = torch.utils.data.DataLoader(ImageDataset(paths, PRE), batch_size=5, collate_fn=collate_skip_errors)
    ok, x, errors = next(iter(loader))
    assert ok == [0, 2, 4] and x.shape == (3, 3, 64, 64)
    assert [i for i, _ in errors] == [1, 3] and errors[1][1] == "file not found"
    ok, x, errors = collate_skip_errors([ImageDataset(paths, PRE, crops=5)[i] for i in (0, 2)])
    assert x.shape == (2, 5, 3, 64, 64)
    assert collate_skip_errors([ImageDataset(paths, PRE)[1]])[1] is None

"""Image loading, resizing and box mapping (clustermac.images)."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from clustermac.images import BOX_TOLERANCE, ImageLoadError, crop_box, load_image, map_box, resize_max


def pattern(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth, asymmetric RGB test pattern (smooth so JPEG keeps it close)."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 90, dtype=float)], axis=2)
    return np.rint(rgb).astype(np.uint8)


def save(tmp_path, name: str, image: Image.Image, **params) -> str:
    path = tmp_path / name
    image.save(path, **params)
    return str(path)


# ------------------------------------------------------------------------- image modes


def test_rgb_png_is_exact(tmp_path):
    array = pattern()
    image = load_image(save(tmp_path, "a.png", Image.fromarray(array)))
    assert image.mode == "RGB" and image.size == (64, 48)
    np.testing.assert_array_equal(np.asarray(image), array)


def test_rgb_jpeg_is_close(tmp_path):
    array = pattern()
    image = load_image(save(tmp_path, "a.jpg", Image.fromarray(array), quality=95))
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - array).mean() < 3


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = pattern()[:, :, 0]
    image = load_image(save(tmp_path, "g.png", Image.fromarray(gray, "L")))
    result = np.asarray(image)
    assert result.shape == (48, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(result[:, :, channel], gray)


def test_one_bit_image(tmp_path):
    bits = pattern()[:, :, 0] > 128
    image = load_image(save(tmp_path, "b.png", Image.fromarray(bits)))
    np.testing.assert_array_equal(np.asarray(image)[:, :, 1], np.where(bits, 255, 0))


def test_palette_image_matches_its_rgb_conversion(tmp_path):
    palette_image = Image.fromarray(pattern()).quantize(colors=16)
    path = save(tmp_path, "p.png", palette_image)
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(path)), expected)


def test_palette_transparency_is_composited_on_white(tmp_path):
    palette_image = Image.fromarray(pattern()).quantize(colors=8)
    index = np.asarray(palette_image)
    transparent_index = int(index[0, 0])
    path = save(tmp_path, "pt.png", palette_image, transparency=transparent_index)
    result = np.asarray(load_image(path))
    assert (result[index == transparent_index] == 255).all()
    kept = index != transparent_index
    expected = np.asarray(palette_image.convert("RGB"))
    np.testing.assert_array_equal(result[kept], expected[kept])


def test_cmyk_jpeg(tmp_path):
    array = pattern()
    cmyk = Image.fromarray(array).convert("CMYK")
    path = save(tmp_path, "c.jpg", cmyk, quality=95)
    with Image.open(path) as opened:
        assert opened.mode == "CMYK"
    result = np.asarray(load_image(path)).astype(int)
    assert result.shape == (48, 64, 3)
    assert np.abs(result - array).mean() < 4


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21) % 65536
    values = values.astype(np.uint16)
    path = save(tmp_path, "s.png", Image.fromarray(values))
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")
    result = np.asarray(load_image(path))
    expected = np.rint(values / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(result[:, :, 0], expected)
    np.testing.assert_array_equal(result[:, :, 2], expected)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :, :3] = pattern()
    rgba[:, :, 3] = 255
    rgba[:, :32, 3] = 0  # left half fully transparent
    rgba[:, 32:40, 3] = 128  # a half-transparent band
    result = np.asarray(load_image(save(tmp_path, "t.png", Image.fromarray(rgba, "RGBA"))))
    assert (result[:, :32] == 255).all()
    np.testing.assert_array_equal(result[:, 40:], pattern()[:, 40:])
    alpha = 128 / 255
    band = pattern()[:, 32:40].astype(float) * alpha + 255 * (1 - alpha)
    assert np.abs(result[:, 32:40] - band).max() <= 1.0


def test_gray_with_alpha(tmp_path):
    la = np.zeros((10, 12, 2), np.uint8)
    la[:, :, 0] = 40
    la[:, :, 1] = 255
    la[:5, :, 1] = 0
    result = np.asarray(load_image(save(tmp_path, "la.png", Image.fromarray(la, "LA"))))
    assert (result[:5] == 255).all() and (result[5:] == 40).all()


@pytest.mark.parametrize("orientation, rotate", [(3, 2), (6, -1), (8, 1)])
def test_exif_orientation_is_applied(tmp_path, orientation, rotate):
    array = pattern(40, 80)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path, f"o{orientation}.jpg", Image.fromarray(array), quality=95, exif=exif)
    result = np.asarray(load_image(path)).astype(int)
    expected = np.rot90(array, k=rotate)  # k = -1: clockwise, as orientation 6 asks
    assert result.shape == expected.shape
    assert np.abs(result - expected).mean() < 3


def test_multi_frame_gif_gives_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((8, 8, 3), value, np.uint8)) for value in (10, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    result = np.asarray(load_image(str(path)))
    assert abs(int(result.mean()) - 10) <= 2


def test_float_tiff(tmp_path):
    values = np.linspace(-20, 300, 48 * 64, dtype=np.float32).reshape(48, 64)
    path = save(tmp_path, "f.tif", Image.fromarray(values, "F"))
    result = np.asarray(load_image(path))
    np.testing.assert_array_equal(result[:, :, 0], np.rint(np.clip(values, 0, 255)).astype(np.uint8))


# ------------------------------------------------------------------------- other sources


def test_pil_image_and_arrays():
    array = pattern()
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(array))), array)
    np.testing.assert_array_equal(np.asarray(load_image(array)), array)
    gray = array[:, :, 1]
    np.testing.assert_array_equal(np.asarray(load_image(gray))[:, :, 2], gray)
    np.testing.assert_array_equal(np.asarray(load_image(gray[:, :, None]))[:, :, 0], gray)
    strided = array[::2, ::3]
    np.testing.assert_array_equal(np.asarray(load_image(strided)), strided)


def test_loaded_image_does_not_alias_the_source():
    original = Image.fromarray(pattern())
    loaded = load_image(original)
    loaded.putpixel((0, 0), (1, 2, 3))
    assert original.getpixel((0, 0)) != (1, 2, 3)


def test_pil_image_with_exif_orientation_is_rotated(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = save(tmp_path, "o.jpg", Image.fromarray(pattern(40, 80)), exif=exif)
    with Image.open(path) as opened:
        assert load_image(opened).size == (40, 80)


@pytest.mark.parametrize(
    "array, words",
    [
        (np.zeros((4, 4, 3), np.float64), "uint8"),
        (np.zeros((4, 4, 2), np.uint8), "shape"),
        (np.zeros(16, np.uint8), "shape"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
    ],
)
def test_bad_arrays_are_refused(array, words):
    with pytest.raises(ValueError, match=words):
        load_image(array)


def test_bad_type_is_refused():
    with pytest.raises(TypeError, match="path, a PIL image or a uint8"):
        load_image(12)


# ------------------------------------------------------------------------- broken files


def test_missing_file(tmp_path):
    path = str(tmp_path / "nothing.jpg")
    with pytest.raises(ImageLoadError, match="nothing.jpg: file does not exist"):
        load_image(path)


def test_directory(tmp_path):
    with pytest.raises(ImageLoadError, match="directory"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg: not an image .*empty"):
        load_image(path)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not a picture\n" * 20)
    with pytest.raises(ImageLoadError, match="notes.png: not an image"):
        load_image(path)


def test_random_bytes_with_jpeg_header(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "garbage.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ImageLoadError, match="garbage.jpg"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=f"cut.{fmt.lower()}: (truncated|corrupt)"):
        load_image(path)


def test_error_is_a_value_error(tmp_path):
    assert issubclass(ImageLoadError, ValueError)


# ------------------------------------------------------------------------- resizing


def test_resize_never_upsamples():
    image = Image.fromarray(pattern(30, 50))
    resized, scale = resize_max(image, 1024)
    assert scale == 1.0 and resized.size == (50, 30)
    np.testing.assert_array_equal(np.asarray(resized), pattern(30, 50))


@pytest.mark.parametrize(
    "size, max_size, expected",
    [
        ((2000, 1000), 1024, (1024, 512)),
        ((1000, 2000), 1024, (512, 1024)),
        ((1025, 3), 1024, (1024, 3)),
        ((5000, 2), 100, (100, 1)),  # the short side never rounds to zero
        ((1024, 1024), 1024, (1024, 1024)),
    ],
)
def test_resize_sizes(size, max_size, expected):
    resized, scale = resize_max(Image.new("RGB", size), max_size)
    assert resized.size == expected
    assert scale == pytest.approx(min(1.0, max_size / max(size)))


def test_resize_accepts_arrays():
    resized, scale = resize_max(pattern(40, 80), 20)
    assert resized.size == (20, 10) and scale == 0.25


def test_resize_keeps_content():
    # A left/right split must stay a left/right split.
    array = np.zeros((400, 800, 3), np.uint8)
    array[:, 400:] = 255
    resized = np.asarray(resize_max(Image.fromarray(array), 100)[0])
    assert resized.shape == (50, 100, 3)
    assert (resized[:, :48] == 0).all() and (resized[:, 52:] == 255).all()


@pytest.mark.parametrize("bad", [0, -5, 2.5, None, True])
def test_resize_bad_max_size(bad):
    with pytest.raises(ValueError, match="max_size"):
        resize_max(Image.new("RGB", (10, 10)), bad)


def test_huge_image_is_loaded_and_resized_with_bounded_memory(tmp_path):
    # 6000×4000 (24 Mpx): decoding needs ~72 MB per RGB copy. Run in a fresh process so the
    # peak resident memory measured is this image's, and check it stays well below what a
    # float copy or many copies would take (a float32 RGB copy alone is 288 MB).
    path = tmp_path / "huge.jpg"
    image = Image.new("RGB", (6000, 4000), (30, 120, 200))
    image.paste((250, 20, 20), (1000, 1000, 3000, 2000))
    image.save(path, quality=85)
    del image
    script = textwrap.dedent(f"""
        import resource
        from clustermac.images import load_image, resize_max
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        image, scale = resize_max(load_image({str(path)!r}), 1024)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(image.size[0], image.size[1], scale, *image.getpixel((341, 256)))
        print(before, after)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.strip().splitlines()[-2:]
    width, height, scale, red, green, blue = first.split()
    assert (int(width), int(height)) == (1024, 683)
    assert float(scale) == pytest.approx(1024 / 6000)
    assert int(red) > 200 and int(green) < 60  # the red rectangle survived at the mapped spot
    before, after = (int(v) for v in second.split())
    assert after - before < 200, f"decoding and resizing took {after - before} MB more"


# ------------------------------------------------------------------------- boxes


def test_map_box_scales_all_coordinates():
    assert map_box((100, 50, 300, 250), 0.5, (1000, 800)) == (50.0, 25.0, 150.0, 125.0)
    assert map_box(np.array([0, 0, 1000, 800]), 0.25, (1000, 800)) == (0.0, 0.0, 250.0, 200.0)


def test_map_box_matches_resize_max():
    original = Image.new("RGB", (3000, 2000))
    resized, scale = resize_max(original, 1024)
    x1, y1, x2, y2 = map_box((0, 0, 3000, 2000), scale, original.size)
    assert (x1, y1) == (0, 0)
    assert x2 == pytest.approx(resized.size[0], abs=0.5)
    assert y2 == pytest.approx(resized.size[1], abs=0.5)


def test_map_box_clips_within_tolerance():
    box = map_box((-0.5, -1.0, 100.5, 51.0), 1.0, (100, 50))
    assert box == (0.0, 0.0, 100.0, 50.0)
    assert BOX_TOLERANCE == 1.0


@pytest.mark.parametrize(
    "box",
    [
        (-10, 0, 50, 50),  # starts left of the image
        (0, 0, 150, 40),  # ends right of the image
        (0, 0, 50, 60),  # ends below
        (200, 200, 300, 300),  # entirely outside
    ],
)
def test_box_outside_is_refused(box):
    with pytest.raises(ValueError, match=r"outside the image of size 100×50"):
        map_box(box, 1.0, (100, 50))


@pytest.mark.parametrize(
    "box, words",
    [
        ((10, 10, 10, 20), "empty"),
        ((10, 10, 5, 20), "empty"),
        ((10, 20, 30, 20), "empty"),
        ((0, 0, float("nan"), 3), "NaN"),
        ((1, 2, 3), "4 numbers"),
        (("a", 2, 3, 4), "4 numbers"),
    ],
)
def test_malformed_box_is_refused(box, words):
    with pytest.raises(ValueError, match=words):
        map_box(box, 1.0, (100, 50))


@pytest.mark.parametrize("scale", [0, -1, float("nan"), float("inf")])
def test_map_box_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        map_box((0, 0, 1, 1), scale, (10, 10))


def test_map_box_bad_image_size():
    with pytest.raises(ValueError, match="image_size"):
        map_box((0, 0, 1, 1), 1.0, (0, 10))
    with pytest.raises(ValueError, match="image_size"):
        map_box((0, 0, 1, 1), 1.0, 10)


def test_crop_box_matches_array_slicing():
    array = pattern(48, 64)
    image = Image.fromarray(array)
    np.testing.assert_array_equal(np.asarray(crop_box(image, (10, 5, 30, 25))), array[5:25, 10:30])
    # Fractional boxes keep every touched pixel.
    np.testing.assert_array_equal(np.asarray(crop_box(image, (10.5, 5.2, 29.1, 24.9))), array[5:25, 10:30])
    # A sub-pixel box still gives one pixel.
    assert crop_box(image, (3.2, 4.2, 3.4, 4.6)).size == (1, 1)


def test_crop_box_refuses_outside():
    with pytest.raises(ValueError, match="outside the image of size 64×48"):
        crop_box(Image.fromarray(pattern()), (0, 0, 70, 10))


def _png_rgb16(values: np.ndarray) -> bytes:
    """A minimal 48-bit RGB PNG (PIL cannot write one): IHDR, one IDAT, IEND."""
    import struct
    import zlib

    height, width, _ = values.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_sixteen_bit_rgb_png(tmp_path):
    values = pattern().astype(np.uint16) * 257  # 8-bit pattern stretched to 16 bits
    values[0, 0] = (65535, 0, 32896)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_rgb16(values))
    result = np.asarray(load_image(path))
    expected = pattern()
    expected[0, 0] = (255, 0, 128)
    assert result.shape == (48, 64, 3)
    assert np.abs(result.astype(int) - expected).max() <= 1


def test_array_layouts_single_channel_and_rgba():
    gray = pattern()[:, :, :1]  # H×W×1 is grayscale
    np.testing.assert_array_equal(np.asarray(load_image(gray)), np.repeat(gray, 3, axis=2))
    rgba = np.dstack([pattern(), np.full(pattern().shape[:2], 0, np.uint8)])  # fully transparent
    assert (np.asarray(load_image(rgba)) == 255).all()  # composited on white
    with pytest.raises(ValueError, match="image array is empty"):
        load_image(np.zeros((0, 5, 3), np.uint8))


def test_lab_image_is_refused_with_its_name():
    lab = Image.new("LAB", (8, 6))
    with pytest.raises(ImageLoadError, match="CIE LAB colour space"):
        load_image(lab)


def test_decompression_bomb_is_an_image_load_error(tmp_path, monkeypatch):
    path = save(tmp_path, "big.png", Image.fromarray(pattern(64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # PIL refuses beyond twice this
    with pytest.raises(ImageLoadError, match=r"big.png: image too large to decode safely"):
        load_image(path)


def test_crop_box_needs_a_pil_image():
    with pytest.raises(TypeError, match="image must be a PIL image, got ndarray"):
        crop_box(pattern(), (0, 0, 4, 4))

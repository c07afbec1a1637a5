import numpy as np
import pytest
from PIL import Image

from pipeline.errors import DataError
from pipeline.features.data import CanvasDataset, ImageItem, find_images, load_rgb, read_split_ids

RGB = np.array([[[200, 10, 30], [0, 255, 128]], [[5, 6, 7], [90, 90, 90]]], dtype=np.uint8)


def save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("L", ".png"), ("LA", ".png"), ("RGBA", ".png"), ("P", ".png"), ("CMYK", ".jpg"), ("1", ".png"), ("RGB", ".webp")],
)
def test_image_modes_become_rgb(tmp_path, mode, suffix):
    src = Image.fromarray(RGB).convert(mode)
    path = save(src, tmp_path / f"x{suffix}", **({"lossless": True} if suffix == ".webp" else {}))
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert out.size == (2, 2)
    expected = np.asarray(src.convert("RGB"))
    tol = 40 if mode == "CMYK" else 0  # CMYK goes through JPEG
    assert np.abs(np.asarray(out).astype(int) - expected).max() <= tol


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "d.png")
    out = np.asarray(load_rgb(path))
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 0], [[0, 255], [128, 4]])
    assert (out[..., 0] == out[..., 2]).all()


def test_palette_with_transparency(tmp_path):
    img = Image.fromarray(RGB).convert("P")
    img.info["transparency"] = 0
    out = load_rgb(save(img, tmp_path / "t.png", transparency=0))
    assert out.mode == "RGB"
    assert out.size == (2, 2)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), dtype=np.uint8))  # 30 wide, 10 high
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = load_rgb(save(img, tmp_path / "r.jpg", exif=exif))
    assert out.size == (10, 30)


@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_bad_files_raise_data_error_naming_the_path(tmp_path, content):
    path = tmp_path / "bad.jpg"
    if content is None:  # a truncated JPEG
        save(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=r"bad\.jpg"):
        load_rgb(path)
    with pytest.raises(DataError, match=r"missing\.jpg"):
        load_rgb(tmp_path / "missing.jpg")


def test_dataset_reports_bad_file_and_goes_on(tmp_path):
    good = save(Image.fromarray(np.full((20, 40, 3), 100, dtype=np.uint8)), tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"junk")
    ds = CanvasDataset([ImageItem("good", good), ImageItem("bad", tmp_path / "bad.png")], 28, (0.5,) * 3, (0.5,) * 3)
    _i, pixels, geom, err = ds[0]
    assert err == ""
    assert pixels.shape == (3, 28, 28)
    assert geom.tolist() == [20, 40, 14, 28, 7, 0]
    _, pixels, geom, err = ds[1]
    assert "bad.png" in err
    assert pixels.abs().sum() == 0
    assert geom.sum() == 0


def test_split_file_with_bare_ids_and_path_pairs(tmp_path):
    (tmp_path / "a.txt").write_text("2007_000032\n2007_000039\n\n")
    (tmp_path / "b.txt").write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    assert read_split_ids(tmp_path / "a.txt") == ["2007_000032", "2007_000039"]
    assert read_split_ids(tmp_path / "b.txt") == ["2007_000032"]


def test_find_images_voc_folder_and_list(tmp_path):
    voc = tmp_path / "VOC"
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i in ("a", "b"):
        save(Image.new("RGB", (4, 4)), voc / "JPEGImages" / f"{i}.jpg")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("b\na\n")
    assert [x.id for x in find_images(voc, "val")] == ["b", "a"]
    with pytest.raises(DataError, match="splits found there: val"):
        find_images(voc, "train")
    with pytest.raises(DataError, match="choose a split"):
        find_images(voc)
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    save(Image.new("RGB", (4, 4)), folder / "images" / "z.png")
    save(Image.new("RGB", (4, 4)), folder / "images" / "y.jpg")
    assert [x.id for x in find_images(folder)] == ["y", "z"]
    lst = tmp_path / "list.txt"
    lst.write_text("set/images/z.png\n")
    assert find_images(lst)[0].path == tmp_path / "set/images/z.png"
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "nope")

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


# --- ADE20K, Cityscapes and folder datasets with splits ---------------------------------------------


def _image(path, value: int = 100):
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(Image.new("RGB", (3, 2), (value,) * 3), path)


def _mask(path, values):
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(Image.fromarray(np.array(values, dtype=np.uint8)), path)


def _workspace(tmp_path, dataset: str):
    from pipeline.workspace import Workspace

    (tmp_path / "ssvt.toml").write_text(f"[dataset]\n{dataset}\n")
    return Workspace.load(tmp_path / "ssvt.toml")


def test_ade20k_layout_imports_with_its_splits_mapping_and_names(tmp_path):
    from pipeline.cache.geometry import fit_geometry
    from pipeline.training.evaluate import class_names

    root = tmp_path / "ADEChallengeData2016"
    for split, prefix in (("training", "ADE_train"), ("validation", "ADE_val")):
        for i in (2, 1):
            _image(root / "images" / split / f"{prefix}_0000000{i}.jpg")
            _mask(root / "annotations" / split / f"{prefix}_0000000{i}.png", [[0, 1, 150], [12, 13, i]])
    ws = _workspace(tmp_path, 'root = "ADEChallengeData2016"\nformat = "ade20k"')
    assert (ws.splits, ws.train_split, ws.val_split) == (("training", "validation"), "training", "validation")
    train = find_images(ws.data_root, ws.train_split, ws.data_format)
    assert [x.id for x in train] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert find_images(root, "train", "ade20k") == train  # mmseg's short split names work too
    assert [x.id for x in find_images(root, "validation")] == ["ADE_val_00000001", "ADE_val_00000002"]  # detected
    with pytest.raises(DataError, match="choose --split training or validation"):
        find_images(root, "test", "ade20k")
    gt = ws.labels["gt"]
    assert (gt.path, gt.mapping) == (root / "annotations", "ade20k")
    reader = gt.reader(ws.num_classes)
    for image_id, last in (("ADE_train_00000002", 1), ("ADE_val_00000001", 0)):
        path, mask = reader.original(image_id)
        assert path.parent.name == ("training" if "train" in image_id else "validation")
        assert mask.tolist() == [[255, 0, 149], [11, 12, last]]  # 0 -> ignore, k -> k - 1
    canvas = reader.canvas("ADE_val_00000002", fit_geometry(2, 3, 14))  # what train-head imports
    assert set(np.unique(canvas).tolist()) <= {255, 0, 1, 11, 12, 149}
    assert ws.num_classes == 150
    names = class_names(ws.num_classes, ws.classes)
    assert names[:5] == ["wall", "building", "sky", "floor", "tree"]
    assert (names[7], names[149], len(set(names))) == ("bed", "flag", 150)


def test_cityscapes_layout_imports_with_train_ids_and_names(tmp_path):
    from pipeline.training.evaluate import class_names

    root = tmp_path / "cityscapes"
    ids = {"train": ["aachen_000000_000019", "aachen_000001_000019", "bochum_000000_000313"], "val": ["lindau_000000_000019"]}
    for split, names in ids.items():
        for image_id in names:
            city = image_id.split("_")[0]
            _image(root / "leftImg8bit" / split / city / f"{image_id}_leftImg8bit.png")
            _mask(root / "gtFine" / split / city / f"{image_id}_gtFine_labelIds.png", [[7, 8, 26], [0, 24, 33]])
    # one image with its trainIds file already made (cityscapesscripts createTrainIdLabelImgs): read as is
    _mask(root / "gtFine" / "train" / "bochum" / "bochum_000000_000313_gtFine_labelTrainIds.png", [[1, 1, 1], [2, 2, 255]])
    ws = _workspace(tmp_path, 'root = "cityscapes"\nformat = "cityscapes"')
    assert (ws.splits, ws.train_split, ws.val_split, ws.num_classes) == (("train", "val"), "train", "val", 19)
    items = find_images(ws.data_root, "train", ws.data_format)
    assert [x.id for x in items] == ids["train"]
    assert items[2].path == root / "leftImg8bit/train/bochum/bochum_000000_000313_leftImg8bit.png"
    assert [x.id for x in find_images(root, "val")] == ids["val"]  # detected from leftImg8bit/
    with pytest.raises(DataError, match="splits found there: train, val"):
        find_images(root, "test", "cityscapes")
    reader = ws.labels["gt"].reader(ws.num_classes)
    assert ws.labels["gt"].mapping == "cityscapes"
    assert reader.original("lindau_000000_000019")[1].tolist() == [[0, 1, 13], [255, 11, 18]]  # road, sidewalk, car
    assert reader.original("bochum_000000_000313")[1].tolist() == [[1, 1, 1], [2, 2, 255]]
    assert reader.original("lindau_000000_000020") is None
    names = class_names(ws.num_classes, ws.classes)
    assert (names[0], names[1], names[13], names[18], len(names)) == ("road", "sidewalk", "car", "bicycle", 19)


def test_folder_dataset_with_split_folders(tmp_path):
    root = tmp_path / "set"
    for split, stems in (("train", ("b", "a")), ("val", ("c",))):
        for stem in stems:
            _image(root / "images" / split / f"{stem}.png")
            _mask(root / "masks" / split / f"{stem}.png", [[1, 0, 2], [0, 255, 1]])
    assert [x.id for x in find_images(root, "train", "folder")] == ["a", "b"]
    assert [x.id for x in find_images(root, "val")] == ["c"]
    with pytest.raises(DataError, match=r"one folder per split \(train, val\); choose one with --split"):
        find_images(root)
    with pytest.raises(DataError, match="no split 'test' there"):
        find_images(root, "test", "folder")
    ws = _workspace(tmp_path, 'root = "set"\nformat = "folder"\nclasses = ["ground", "tree", "sky"]')
    assert (ws.splits, ws.num_classes, ws.classes) == (("train", "val"), 3, ("ground", "tree", "sky"))
    assert ws.labels["gt"].reader(ws.num_classes).original("c")[1].tolist() == [[1, 0, 2], [0, 255, 1]]

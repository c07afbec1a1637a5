"""Label set: every label kind of the toy workspace imported onto a small feature store of the toy
train split, checked against references computed here from the source files (nearest resize in
integer arithmetic, click and stroke positions from the JSON/XML/PNG) and read back with plain h5py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.cache import label_readers as readers
from pipeline.cache import labels as labels_module
from pipeline.cache.geometry import IGNORE, Geometry, fit_geometry, mask_to_canvas
from pipeline.cache.label_kinds import LabelSource
from pipeline.cache.label_readers import sparse_mask_to_canvas
from pipeline.cache.labels import LabelSet, ensure_labels, import_labels
from pipeline.cache.names import label_set_path
from pipeline.cache.store import FeatureStore
from pipeline.cache.voc import NUM_CLASSES, SCRIBBLE_TAGS
from pipeline.config import ExtractConfig
from pipeline.errors import LabelError, StoreError
from pipeline.features.data import find_images
from pipeline.features.extract import extract
from pipeline.workspace import Workspace, label_source

SIZE = 56
#: name -> (kind, sparse) of the toy workspace's sources and of the extra folders imported by path.
KINDS = {
    "gt": ("mask", False), "scribble": ("scribble-xml", True), "point": ("points-json", True), "seam": ("mask", False),
    "eps": ("mask", False), "vl": ("mask", False), "cls": ("cls-labels", False),
    "rgb": ("rgb-mask", False), "rgb_as_mask": ("mask", False), "scribble_png": ("scribble-png", True),
}  # fmt: skip
DENSE = ("gt", "seam", "eps", "vl")
RGB_IMAGES = 3  # the toy writes RGB copies of the first three GT masks only


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_store(toy, tmp_path_factory) -> Path:
    """The toy train split extracted once at 56 px with a random tiny ViT (a 4 x 4 token grid)."""
    out = tmp_path_factory.mktemp("base") / "train.zarr"
    cfg = ExtractConfig(model="vit_tiny_test", random_init=True, size=SIZE, workers=0)
    extract(find_images(toy.voc_root, "train"), out, cfg)
    return out


@pytest.fixture
def store(base_store, tmp_path) -> FeatureStore:
    """A private copy of the store, so the label files a test writes start from nothing."""
    dst = tmp_path / "cache" / "train.zarr"
    shutil.copytree(base_store, dst)
    return FeatureStore.open(dst)


@pytest.fixture(scope="module")
def sources(toy) -> dict[str, LabelSource]:
    ws = Workspace.load(toy.workspace)
    extra = {
        "rgb": LabelSource("rgb", "rgb-mask", toy.root / "labels" / "gt_rgb"),
        "rgb_as_mask": LabelSource("rgb_as_mask", "mask", toy.root / "labels" / "gt_rgb"),
        "scribble_png": LabelSource("scribble_png", "scribble-png", toy.root / "labels" / "scribbles_png"),
    }
    return {**ws.labels, **extra}


@pytest.fixture(scope="module")
def imported(base_store, sources, tmp_path_factory) -> tuple[FeatureStore, dict[str, LabelSet]]:
    """Every source imported once into a copy of the store."""
    dst = tmp_path_factory.mktemp("imported") / "train.zarr"
    shutil.copytree(base_store, dst)
    fs = FeatureStore.open(dst)
    return fs, {name: ensure_labels(src, fs, num_classes=NUM_CLASSES) for name, src in sources.items()}


def copy_source(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src" / src.name
    shutil.copytree(src, dst)
    return dst


def h5_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".h5" in p.name)


# --- independent references ----------------------------------------------------------------------


def nearest_axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index of each of ``n_out`` output pixels under a pixel-centre nearest resize, in exact
    integer arithmetic: floor((j + 0.5) * n_in / n_out). Where the output centre falls exactly on a
    source pixel border (a tie) both neighbours are nearest; returns (low, high) candidates."""
    num = (2 * np.arange(n_out) + 1) * n_in
    high = np.minimum(num // (2 * n_out), n_in - 1)
    low = np.where(num % (2 * n_out) == 0, high - 1, high)
    return np.maximum(low, 0), high


def check_nearest(canvas: np.ndarray, mask: np.ndarray, g: Geometry) -> int:
    """Asserts ``canvas`` is ``mask`` nearest-resized into the content box with 255 padding; returns
    the number of content pixels that sit on a tie (where either neighbour is accepted)."""
    rows, cols = nearest_axis(g.height, g.resized_height), nearest_axis(g.width, g.resized_width)
    box = canvas[g.pad_top : g.pad_top + g.resized_height, g.pad_left : g.pad_left + g.resized_width]
    ok = np.zeros(box.shape, dtype=bool)
    for r in rows:
        for c in cols:
            ok |= box == mask[np.ix_(r, c)]
    assert ok.all(), f"{(~ok).sum()} canvas pixels are no nearest neighbour of the mask"
    exact = box == mask[np.ix_(rows[1], cols[1])]
    assert (canvas[~g.content_mask()] == IGNORE).all()
    return int((~exact).sum())


def canvas_coord(v: np.ndarray, n_in: int, n_out: int, pad: int) -> np.ndarray:
    """Continuous canvas coordinate (pixel centres at integers) of original pixel-centre coordinates ``v``."""
    return (np.asarray(v, dtype=np.float64) + 0.5) * n_out / n_in - 0.5 + pad


def source_mask(folder: Path, image_id: str) -> np.ndarray:
    return np.array(Image.open(folder / f"{image_id}.png"))


# --- every kind imports, with its record ---------------------------------------------------------


@pytest.mark.parametrize("name", list(KINDS))
def test_every_kind_imports_with_a_consistent_record(imported, sources, name):
    fs, sets = imported
    ls = sets[name]
    kind, sparse = KINDS[name]
    assert ls.path == fs.path.parent / f"train.labels.{name}.h5" == label_set_path(fs.path, name)
    assert {"name": name, "path": str(ls.path)} in fs.label_sets()
    assert (ls.name, ls.kind, ls.sparse, ls.canvas) == (name, kind, sparse, SIZE)
    n = fs.n_images
    with h5py.File(ls.path, "r") as f:  # the file as cache_layout.md describes it, without our reader
        masks = f["masks"][...]
        ds = f["masks"]
        assert (ds.shape, ds.dtype, ds.chunks) == ((n, SIZE, SIZE), np.uint8, (1, SIZE, SIZE))
        assert (ds.compression, ds.fillvalue) == ("lzf", IGNORE)
        pixel_count, hist = f["pixel_count"][...], f["class_histogram"][...]
        assert "image_labels" in f if kind == "cls-labels" else "image_labels" not in f
        rows = f["image_labels"][...].tobytes() if "image_labels" in f else b""
    np.testing.assert_array_equal(ls.masks(np.arange(n)), masks)
    np.testing.assert_array_equal(ls.masks(np.array([5, 0, 5])), masks[[5, 0, 5]])
    assert ls.masks(np.array([], dtype=np.int64)).shape == (0, SIZE, SIZE)
    labelled = masks != IGNORE
    assert set(np.unique(masks[labelled])) <= set(range(NUM_CLASSES))
    geoms = fs.geometries()
    for i, g in enumerate(geoms):
        assert (masks[i][~g.content_mask()] == IGNORE).all(), "padding must be 255"
    np.testing.assert_array_equal(pixel_count, labelled.sum(axis=(1, 2)))
    np.testing.assert_array_equal(hist, np.bincount(masks[labelled], minlength=NUM_CLASSES))
    np.testing.assert_array_equal(ls.labelled, pixel_count > 0)
    a = ls.attrs
    content = sum(g.resized_height * g.resized_width for g in geoms)
    assert (a["class_histogram"], a["num_classes"], a["images"]) == (hist.tolist(), NUM_CLASSES, n)
    assert a["labelled_fraction"] == pytest.approx(pixel_count.sum() / content)
    assert a["source"] == str(sources[name].path)
    assert a["source_sha256"] == labels_module.source_fingerprint(sources[name])
    assert (a["store_fingerprint"], a["ssvt_label_schema"]) == (fs.fingerprint(), labels_module.LABEL_SCHEMA)
    assert ls.fingerprint == hashlib.sha256(masks.tobytes() + rows).hexdigest()
    covered = RGB_IMAGES if name.startswith("rgb") else n
    assert (a["images_labelled"], a["images_without_label"]) == (covered, n - covered)
    if kind == "cls-labels":  # image-level: no pixel is labelled, every image is covered by an entry
        assert (pixel_count.sum(), a["labelled_fraction"], ls.labelled.sum()) == (0, 0.0, 0)
    else:
        assert 0 < a["labelled_fraction"] <= 1
        assert ls.labelled.sum() == covered
    if not sparse and kind != "cls-labels":
        assert a["labelled_fraction"] > 0.5 * covered / n, "a dense mask labels most content pixels of its images"


def test_labelled_fraction_orders_the_kinds(imported):
    """Points < scribbles < masks with void < pseudo-masks (which label every pixel)."""
    frac = {name: ls.attrs["labelled_fraction"] for name, ls in imported[1].items()}
    assert frac["point"] < frac["scribble"] < frac["vl"] < frac["gt"] < frac["eps"] == frac["seam"] == 1.0


# --- dense masks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DENSE)
def test_dense_masks_equal_an_independent_nearest_resize(imported, sources, name):
    fs, sets = imported
    masks = sets[name].masks(np.arange(fs.n_images))
    ties = 0
    for i, (image_id, g) in enumerate(zip(fs.ids, fs.geometries(), strict=True)):
        ties += check_nearest(masks[i], source_mask(sources[name].path, image_id), g)
    assert ties < 0.01 * masks.size, "ties must be rare or the check above is loose"


def test_rgb_masks_decode_to_the_palette_masks(imported):
    fs, sets = imported
    gt, idx = sets["gt"].masks(np.arange(fs.n_images)), np.arange(RGB_IMAGES)
    for name in ("rgb", "rgb_as_mask"):
        masks = sets[name].masks(np.arange(fs.n_images))
        np.testing.assert_array_equal(masks[idx], gt[idx])
        assert (masks[RGB_IMAGES:] == IGNORE).all()
        np.testing.assert_array_equal(sets[name].labelled, np.arange(fs.n_images) < RGB_IMAGES)


def test_vl_low_confidence_255_stays_unlabelled(imported, sources):
    fs, sets = imported
    masks = sets["vl"].masks(np.arange(fs.n_images))
    for i, image_id in enumerate(fs.ids):
        src = source_mask(sources["vl"].path, image_id)
        assert 0 < (src == IGNORE).sum() < src.size
        g = fs.geometries()[i]
        # the canvas box is 255 exactly where the nearest source pixel is 255 (ties aside)
        check_nearest(masks[i], src, g)
    assert 0.3 < sets["vl"].attrs["labelled_fraction"] < 0.95


# --- points --------------------------------------------------------------------------------------


def test_every_in_image_click_is_on_the_canvas_and_outside_clicks_are_counted(imported, toy):
    fs, sets = imported
    masks = sets["point"].masks(np.arange(fs.n_images))
    fg = json.loads((toy.root / "labels" / "points.json").read_text())
    bg = json.loads((toy.root / "labels" / "points_bg.json").read_text())
    outside, separated = 0, 0
    for i, (image_id, g) in enumerate(zip(fs.ids, fs.geometries(), strict=True)):
        clicks = [(c["x"], c["y"], c["cls"]) for c in fg[image_id]] + [(c["x"], c["y"], 0) for c in bg[image_id]]
        inside = [(x, y, c) for x, y, c in clicks if 0 <= x < g.width and 0 <= y < g.height]
        outside += len(clicks) - len(inside)
        xy = np.stack(
            [
                canvas_coord([x for x, _, _ in inside], g.width, g.resized_width, g.pad_left),
                canvas_coord([y for _, y, _ in inside], g.height, g.resized_height, g.pad_top),
            ],
            axis=1,
        )
        gap = min((np.abs(a - b).max() for k, a in enumerate(xy) for b in xy[k + 1 :]), default=np.inf)
        if gap < 2:  # two clicks may share a canvas pixel; the foreground one wins there (checked below)
            assert (masks[i] != IGNORE).sum() <= len(inside)
            continue
        separated += 1
        assert (masks[i] != IGNORE).sum() == len(inside), image_id
        for (cx, cy), (_, _, cls) in zip(xy, inside, strict=True):
            # the nearest canvas pixel (either one on an exact tie) holds the click's class
            near = masks[i][int(np.floor(cy)) : int(np.ceil(cy)) + 1, int(np.floor(cx)) : int(np.ceil(cx)) + 1]
            assert (near == cls).any(), (image_id, cx, cy, cls)
    assert separated >= 10, "most images should have well separated clicks, or the check is vacuous"
    assert outside > 0
    assert sets["point"].attrs["points_dropped"] == outside == toy.summary["clicks_outside"]


def test_foreground_click_wins_over_background_on_a_shared_pixel(imported, toy, store, tmp_path):
    fs, _ = imported
    image_id, g = fs.ids[0], fs.geometries()[0]
    x, y = g.width // 2, g.height // 2
    fg, bg = tmp_path / "fg.json", tmp_path / "bg.json"
    fg.write_text(json.dumps({image_id: [{"x": x, "y": y, "cls": 15, "rank": 1}]}))
    bg.write_text(json.dumps({image_id: [{"x": x, "y": y, "cls": 0, "rank": 1}]}))
    ls = import_labels(LabelSource("clash", "points-json", fg, bg), store, num_classes=NUM_CLASSES)
    assert set(np.unique(ls.masks(np.array([0])))) == {15, IGNORE}
    assert ls.attrs["images_without_label"] == fs.n_images - 1


def test_label_source_given_as_a_path(imported, toy, store):
    src = label_source(str(toy.root / "labels" / "points.json"), None)
    assert (src.name, src.kind) == ("points", "points-json")
    ls = ensure_labels(src, store, num_classes=NUM_CLASSES)
    assert ls.path.name == "train.labels.points.h5"
    fg_only = ls.masks(np.arange(store.n_images))
    both = imported[1]["point"].masks(np.arange(store.n_images))
    assert ((fg_only != IGNORE) <= (both != IGNORE)).all()
    assert (fg_only != IGNORE).sum() < (both != IGNORE).sum()
    assert (fg_only[fg_only != IGNORE] > 0).all(), "the foreground file holds object clicks only"


# --- scribbles -----------------------------------------------------------------------------------


def xml_strokes(path: Path) -> list[tuple[int, np.ndarray]]:
    """(class, (n, 2) x, y) of each ``<polygon>`` of a ScribbleSup file, parsed here with ElementTree."""
    out = []
    for poly in ET.parse(path).getroot().iter("polygon"):
        xy = [(float(pt.findtext("X", "nan")), float(pt.findtext("Y", "nan"))) for pt in poly.iter("point")]
        out.append((SCRIBBLE_TAGS[poly.findtext("tag", "").lower()], np.array(xy)))
    return out


def test_scribble_xml_strokes_lie_inside_the_content_with_their_classes(imported, sources):
    fs, sets = imported
    masks = sets["scribble"].masks(np.arange(fs.n_images))
    outside = 0
    for i, (image_id, g) in enumerate(zip(fs.ids, fs.geometries(), strict=True)):
        strokes = xml_strokes(sources["scribble"].path / f"{image_id}.xml")
        canvas = masks[i]
        assert (canvas[~g.content_mask()] == IGNORE).all()
        assert set(np.unique(canvas[canvas != IGNORE])) == {c for c, _ in strokes}
        for cls, xy in strokes:
            keep = (xy[:, 0] >= 0) & (xy[:, 0] < g.width) & (xy[:, 1] >= 0) & (xy[:, 1] < g.height)
            outside += int((~keep).sum())
            cx = np.rint(canvas_coord(xy[keep, 0], g.width, g.resized_width, g.pad_left)).astype(int)
            cy = np.rint(canvas_coord(xy[keep, 1], g.height, g.resized_height, g.pad_top)).astype(int)
            hits = [(canvas[max(0, y - 1) : y + 2, max(0, x - 1) : x + 2] == cls).any() for x, y in zip(cx, cy, strict=True)]
            assert np.mean(hits) > 0.5, f"{image_id}: a class-{cls} stroke is missing from the canvas"
    assert outside > 0
    assert sets["scribble"].attrs["points_dropped"] == outside


def stroke_components(mask: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(class, (n, 2) y, x pixels) of each 8-connected stroke of a scribble raster."""
    out = []
    for cls in np.unique(mask[mask != IGNORE]):
        lab, n = ndimage.label(mask == cls, structure=np.ones((3, 3)))
        out += [(int(cls), np.argwhere(lab == k)) for k in range(1, n + 1)]
    return out


def lost_strokes(canvas: np.ndarray, mask: np.ndarray, g: Geometry) -> int:
    """Strokes of ``mask`` with no pixel of their class on ``canvas`` within 1 px of where they map."""
    lost = 0
    for cls, yx in stroke_components(mask):
        cy = np.rint(canvas_coord(yx[:, 0], g.height, g.resized_height, g.pad_top)).astype(int)
        cx = np.rint(canvas_coord(yx[:, 1], g.width, g.resized_width, g.pad_left)).astype(int)
        near = np.zeros(canvas.shape, dtype=bool)
        near[np.clip(cy, 0, g.canvas - 1), np.clip(cx, 0, g.canvas - 1)] = True
        lost += not (canvas[ndimage.binary_dilation(near, np.ones((3, 3)))] == cls).any()
    return lost


def test_scribble_png_strokes_survive_the_store_downscale(imported, sources):
    fs, sets = imported
    masks = sets["scribble_png"].masks(np.arange(fs.n_images))
    for i, (image_id, g) in enumerate(zip(fs.ids, fs.geometries(), strict=True)):
        src = source_mask(sources["scribble_png"].path, image_id)
        assert lost_strokes(masks[i], src, g) == 0, image_id
        # every labelled canvas pixel comes from a source pixel of its class within a pixel
        for cls in np.unique(masks[i][masks[i] != IGNORE]):
            yx = np.argwhere(src == cls)
            cy = np.rint(canvas_coord(yx[:, 0], g.height, g.resized_height, g.pad_top)).astype(int)
            cx = np.rint(canvas_coord(yx[:, 1], g.width, g.resized_width, g.pad_left)).astype(int)
            mapped = np.zeros(masks[i].shape, dtype=bool)
            mapped[cy, cx] = True
            assert not ((masks[i] == cls) & ~ndimage.binary_dilation(mapped, np.ones((3, 3)))).any()


def test_scribble_png_strokes_survive_a_strong_downscale_where_nearest_loses_them(toy, sources):
    folder, size = sources["scribble_png"].path, 28
    lost_ours, lost_nearest, strokes = 0, 0, 0
    for image_id in toy.train_ids:
        src = source_mask(folder, image_id)
        g = fit_geometry(*src.shape, size)  # 5-7x smaller than the image: 3-px strokes become sub-pixel
        strokes += len(stroke_components(src))
        lost_ours += lost_strokes(sparse_mask_to_canvas(src, g), src, g)
        lost_nearest += lost_strokes(mask_to_canvas(src, g), src, g)
    assert lost_ours == 0
    assert lost_nearest > 0, "a plain nearest resize should lose some strokes at this scale"
    assert strokes > 3 * len(toy.train_ids)


# --- errors --------------------------------------------------------------------------------------


def test_value_outside_the_classes_names_the_file_and_the_value(toy, store, sources, tmp_path):
    folder = copy_source(sources["eps"].path, tmp_path)
    bad = folder / f"{store.ids[4]}.png"
    arr = np.array(Image.open(bad))
    arr[:5, :5] = 42
    Image.fromarray(arr).save(bad)
    with pytest.raises(LabelError, match=rf"{bad}.*\[42\]"):
        ensure_labels(LabelSource("bad", "mask", folder), store, num_classes=NUM_CLASSES)
    assert h5_files(store.path.parent) == []
    # with fewer classes, ordinary class ids are out of range too, and named
    with pytest.raises(LabelError, match=r"are neither classes 0\.\.4 nor 255"):
        ensure_labels(sources["eps"], store, num_classes=5)


def test_mask_of_the_wrong_size_names_the_file(store, sources, tmp_path):
    folder = copy_source(sources["gt"].path, tmp_path)
    bad = folder / f"{store.ids[2]}.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
    with pytest.raises(LabelError, match=rf"{bad} is 12x10 but its image is"):
        ensure_labels(LabelSource("small", "mask", folder), store, num_classes=NUM_CLASSES)


def test_ids_not_matching_the_store_are_refused(store, sources, tmp_path):
    folder = tmp_path / "renamed"
    folder.mkdir()
    for p in sources["eps"].path.iterdir():
        shutil.copy(p, folder / f"x{p.name}")
    with pytest.raises(LabelError, match="no label for any of the 16 images"):
        ensure_labels(LabelSource("renamed", "mask", folder), store, num_classes=NUM_CLASSES)
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"1999_000001": [{"x": 1, "y": 1, "cls": 3}]}))
    with pytest.raises(LabelError, match="no label for any"):
        ensure_labels(LabelSource("pts", "points-json", points), store, num_classes=NUM_CLASSES)
    cls = tmp_path / "cls.npy"
    np.save(cls, {"1999_000001": np.ones(20, np.float32)}, allow_pickle=True)
    with pytest.raises(LabelError, match="no entry for any image id"):
        ensure_labels(LabelSource("cls", "cls-labels", cls), store, num_classes=NUM_CLASSES)
    assert h5_files(store.path.parent) == []


def test_images_without_label_are_left_out_and_strict_fails(store, sources, tmp_path, caplog):
    folder = copy_source(sources["eps"].path, tmp_path)
    gone = [1, 7, 12]
    for i in gone:
        (folder / f"{store.ids[i]}.png").unlink()
    src = LabelSource("partial", "mask", folder)
    with pytest.raises(LabelError, match=rf"3 images have no label in 'partial' \(first: {store.ids[1]}\).*--strict"):
        ensure_labels(src, store, num_classes=NUM_CLASSES, strict=True)
    assert h5_files(store.path.parent) == []
    seen: list[tuple[int, int]] = []
    ls = ensure_labels(src, store, num_classes=NUM_CLASSES, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, store.n_images) for i in range(1, store.n_images + 1)]
    assert "3 of 16 images have no label in 'partial'" in caplog.text
    np.testing.assert_array_equal(np.flatnonzero(~ls.labelled), gone)
    assert (ls.masks(np.array(gone)) == IGNORE).all()
    assert (ls.attrs["images_labelled"], ls.attrs["images_without_label"]) == (13, 3)
    # the lenient import exists now; --strict must still fail rather than reuse it
    with pytest.raises(LabelError, match=r"3 images have no label in 'partial'.*--strict"):
        ensure_labels(src, store, num_classes=NUM_CLASSES, strict=True)
    full = ensure_labels(sources["eps"], store, num_classes=NUM_CLASSES)
    keep = np.setdiff1d(np.arange(store.n_images), gone)
    np.testing.assert_array_equal(ls.masks(keep), full.masks(keep))


def test_cls_labels_with_integer_keys_equal_the_string_keys(imported, toy, store, sources):
    _, sets = imported
    rows = sets["cls"].image_labels()
    ints = LabelSource("cls_int", "cls-labels", toy.root / "labels" / "cls_labels_int.npy")
    ls = ensure_labels(ints, store, num_classes=NUM_CLASSES)
    assert rows is not None
    assert (rows.dtype, rows.shape) == (np.float32, (store.n_images, NUM_CLASSES - 1))
    np.testing.assert_array_equal(ls.image_labels(), rows)
    assert ls.fingerprint == sets["cls"].fingerprint
    # and they are the classes present in the ground truth, background slot left out
    for i, image_id in enumerate(store.ids):
        present = np.unique(source_mask(sources["gt"].path, image_id))
        np.testing.assert_array_equal(rows[i], np.isin(np.arange(1, NUM_CLASSES), present).astype(np.float32))
    assert sets["gt"].image_labels() is None


def test_cls_labels_missing_ids_are_reported_and_strict_fails(imported, store, sources, tmp_path):
    raw = readers.read_cls_labels(sources["cls"].path)
    part = tmp_path / "cls_part.npy"
    np.save(part, {k: v for k, v in raw.items() if k not in store.ids[:4]}, allow_pickle=True)
    src = LabelSource("cls_part", "cls-labels", part)
    with pytest.raises(LabelError, match="4 images have no label"):
        ensure_labels(src, store, num_classes=NUM_CLASSES, strict=True)
    ls = ensure_labels(src, store, num_classes=NUM_CLASSES)
    assert (ls.attrs["images_labelled"], ls.attrs["images_without_label"]) == (12, 4)
    rows = ls.image_labels()
    assert rows is not None
    assert not rows[:4].any()
    assert rows[4:].any(axis=1).all()
    assert ls.fingerprint != imported[1]["cls"].fingerprint, "the fingerprint covers the image-level rows"


# --- re-import detection and crash safety ----------------------------------------------------------


def test_unchanged_source_is_not_reimported_and_a_changed_one_is(store, sources, tmp_path):
    folder = copy_source(sources["eps"].path, tmp_path)
    src = LabelSource("eps", "mask", folder)
    first = ensure_labels(src, store, num_classes=NUM_CLASSES)
    stat = first.path.stat()
    again = ensure_labels(src, store, num_classes=NUM_CLASSES)
    assert (again.path.stat().st_mtime_ns, again.path.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    assert again.attrs == first.attrs
    # touching a file (same bytes, new mtime) re-imports; the label content, hence fingerprint, is the same
    target = folder / f"{store.ids[3]}.png"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    touched = ensure_labels(src, store, num_classes=NUM_CLASSES)
    assert touched.path.stat().st_ino != stat.st_ino
    assert touched.attrs["source_sha256"] != first.attrs["source_sha256"]
    assert touched.fingerprint == first.fingerprint
    # changing a mask's content re-imports and changes the fingerprint
    arr = np.array(Image.open(target))
    arr[arr == 0] = 15
    Image.fromarray(arr).save(target)
    changed = ensure_labels(src, store, num_classes=NUM_CLASSES)
    assert changed.fingerprint != first.fingerprint
    assert changed.attrs["class_histogram"][15] > first.attrs["class_histogram"][15]
    check_nearest(changed.masks(np.array([3]))[0], arr, store.geometries()[3])


def test_a_changed_class_count_reimports_and_validates_again(store, sources):
    ls = ensure_labels(sources["eps"], store, num_classes=NUM_CLASSES)
    assert ls.attrs["num_classes"] == NUM_CLASSES
    with pytest.raises(LabelError, match=r"are neither classes 0\.\.4 nor 255"):
        ensure_labels(sources["eps"], store, num_classes=5)
    assert LabelSet.open(ls.path).attrs == ls.attrs, "the failed re-import leaves the old set in place"


def test_changed_single_file_source_is_reimported(store, toy, tmp_path):
    points = tmp_path / "points.json"
    shutil.copy(toy.root / "labels" / "points.json", points)
    src = LabelSource("pts", "points-json", points)
    first = ensure_labels(src, store, num_classes=NUM_CLASSES)
    data = json.loads(points.read_text())
    data.pop(store.ids[0])
    points.write_text(json.dumps(data))
    second = ensure_labels(src, store, num_classes=NUM_CLASSES)
    assert second.fingerprint != first.fingerprint
    assert (first.labelled[0], second.labelled[0]) == (True, False)


def test_a_crash_during_import_leaves_no_partial_file(store, sources, monkeypatch):
    calls = {"n": 0}
    real = readers.read_mask

    def failing(path):
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("disk on fire")
        return real(path)

    monkeypatch.setattr(readers, "read_mask", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ensure_labels(sources["eps"], store, num_classes=NUM_CLASSES)
    assert h5_files(store.path.parent) == []
    # an existing label set survives a crashed re-import untouched
    monkeypatch.setattr(readers, "read_mask", real)
    good = ensure_labels(sources["eps"], store, num_classes=NUM_CLASSES)
    before = good.path.read_bytes()
    calls["n"] = 0
    monkeypatch.setattr(readers, "read_mask", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        import_labels(sources["eps"], store, num_classes=NUM_CLASSES)
    assert h5_files(store.path.parent) == [good.path.name]
    assert good.path.read_bytes() == before


def test_open_refuses_unreadable_and_newer_label_stores(imported, tmp_path):
    _, sets = imported
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable ssvt label set"):
        LabelSet.open(junk)
    newer = tmp_path / "newer.h5"
    shutil.copy(sets["eps"].path, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["ssvt_label_schema"] = labels_module.LABEL_SCHEMA + 1
    with pytest.raises(StoreError, match="newer than this ssvt"):
        LabelSet.open(newer)

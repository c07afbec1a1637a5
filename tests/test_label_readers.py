"""Label readers on make-toy files and on the awkward cases people have, and sparse-label rasterising.

The ``toy`` fixture (conftest.py) is a session-wide make-toy dataset, read-only here.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.cache.geometry import Geometry, fit_geometry, points_to_canvas
from pipeline.cache.label_readers import (
    Point,
    Stroke,
    draw_points,
    draw_strokes,
    find_mask,
    normalize_id,
    read_cls_labels,
    read_mask,
    read_points_json,
    read_scribble_xml,
)
from pipeline.cache.voc import palette
from pipeline.errors import LabelError
from pipeline.toy.dataset import ToyDataset


def _gt(toy: ToyDataset, image_id: str) -> np.ndarray:
    with Image.open(toy.voc_root / "SegmentationClass" / f"{image_id}.png") as im:
        return np.array(im)


# --- masks ---------------------------------------------------------------------------------------


def test_palette_and_grayscale_masks_read_as_indices(toy: ToyDataset) -> None:
    for image_id in toy.train_ids:
        path = toy.voc_root / "SegmentationClass" / f"{image_id}.png"
        mask = read_mask(path)
        assert mask.dtype == np.uint8
        assert mask.shape == _gt(toy, image_id).shape
        assert np.array_equal(mask, _gt(toy, image_id))
        assert (mask == 255).any()
        with Image.open(toy.root / "labels" / "pseudo_seam" / f"{image_id}.png") as im:
            assert np.array_equal(read_mask(im.filename), np.asarray(im))


def test_rgb_masks_decode_back_to_the_palette_indices(toy: ToyDataset, tmp_path: Path) -> None:
    rgb_files = sorted((toy.root / "labels" / "gt_rgb").glob("*.png"))
    assert rgb_files
    for path in rgb_files:
        expected = _gt(toy, path.stem)
        assert np.array_equal(read_mask(path), expected)
        rgba = np.dstack([palette()[expected], np.full(expected.shape, 200, np.uint8)])
        Image.fromarray(rgba).save(tmp_path / "rgba.png")
        assert np.array_equal(read_mask(tmp_path / "rgba.png"), expected)


def test_unknown_rgb_colours_name_the_file_and_colours(tmp_path: Path) -> None:
    rgb = palette()[np.zeros((6, 8), np.uint8)]
    rgb[0, 0] = (1, 2, 3)
    rgb[1, :3] = (250, 0, 7)
    path = tmp_path / "smoothed.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(LabelError, match=r"smoothed\.png.*4 pixels.*\(250, 0, 7\), \(1, 2, 3\)"):
        read_mask(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_masks(toy: ToyDataset, tmp_path: Path, suffix: str) -> None:
    gt = _gt(toy, toy.train_ids[0])
    path = tmp_path / f"wide{suffix}"
    Image.fromarray(gt.astype(np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    assert np.array_equal(read_mask(path), gt)
    big = gt.astype(np.uint16)
    big[0, 0] = 300
    Image.fromarray(big).save(path)
    with pytest.raises(LabelError, match=r"wide.*0\.\.300"):
        read_mask(path)


def test_unreadable_and_missing_masks(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(LabelError, match=r"junk\.png"):
        read_mask(tmp_path / "junk.png")
    with pytest.raises(LabelError, match="no mask file"):
        read_mask(tmp_path / "absent.png")


def test_find_mask(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "a.bmp")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "b.bmp")
    assert find_mask(tmp_path, "a") == tmp_path / "a.bmp"
    assert find_mask(tmp_path, "b") == tmp_path / "b.png"
    assert find_mask(tmp_path, "c") is None


def _save_mask(path: Path, values: list[list[int]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(values, dtype=np.uint8)).save(path)
    return path


def test_ade20k_masks_reduce_the_zero_label(tmp_path: Path) -> None:
    """mmseg's reduce_zero_label: 0 (other) -> 255, k -> k - 1, 255 stays 255."""
    path = _save_mask(tmp_path / "ADE_val_00000001.png", [[0, 1, 2], [150, 255, 0]])
    assert read_mask(path, "ade20k").tolist() == [[255, 0, 1], [149, 255, 255]]
    assert read_mask(path).tolist() == [[0, 1, 2], [150, 255, 0]]  # no mapping: as on disk


def test_cityscapes_label_ids_become_train_ids(tmp_path: Path) -> None:
    """Entries of cityscapesscripts' labels.py, checked by hand: road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13,
    bicycle 33 -> 18; unlabeled 0, parking 9, polegroup 18 and caravan 29 -> 255 (ignore)."""
    label_ids = _save_mask(tmp_path / "aachen_000000_000019_gtFine_labelIds.png", [[7, 8, 26, 33], [0, 9, 18, 29]])
    assert read_mask(label_ids, "cityscapes").tolist() == [[0, 1, 13, 18], [255, 255, 255, 255]]
    train_ids = _save_mask(tmp_path / "aachen_000000_000019_gtFine_labelTrainIds.png", [[0, 1], [13, 255]])
    assert read_mask(train_ids, "cityscapes").tolist() == [[0, 1], [13, 255]]  # trainIds already


def test_masks_are_found_one_split_folder_down(tmp_path: Path) -> None:
    """masks/<split>/<id>.png; Cityscapes names (trainIds before labelIds); an id in two splits is an error."""
    masks = tmp_path / "masks"
    _save_mask(masks / "train" / "a.png", [[1]])
    _save_mask(masks / "val" / "b.png", [[2]])
    assert find_mask(masks, "a") == masks / "train" / "a.png"
    assert find_mask(masks, "b") == masks / "val" / "b.png"
    assert find_mask(masks, "c") is None
    _save_mask(masks / "val" / "a.png", [[3]])
    with pytest.raises(LabelError, match=r"'a' in several splits \(train/a.png, val/a.png\)"):
        find_mask(masks, "a")
    gt = tmp_path / "gtFine"
    label_ids = _save_mask(gt / "val" / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", [[26]])
    assert find_mask(gt, "lindau_000000_000019", "cityscapes") == label_ids
    train_ids = _save_mask(label_ids.with_name("lindau_000000_000019_gtFine_labelTrainIds.png"), [[13]])
    assert find_mask(gt, "lindau_000000_000019", "cityscapes") == train_ids
    assert find_mask(gt, "lindau_000000_000019") is None  # plain <id>.png names only without the mapping


# --- scribbles -----------------------------------------------------------------------------------


def test_scribble_xml_from_make_toy(toy: ToyDataset) -> None:
    """Every in-image point of every stroke lies on its class in the GT (toy strokes stay inside)."""
    seen = set()
    for image_id in toy.train_ids:
        gt = _gt(toy, image_id)
        strokes, size = read_scribble_xml(toy.root / "labels" / "scribbles" / f"{image_id}.xml")
        assert size == gt.shape
        assert any(s.class_id == 0 for s in strokes)
        assert any(s.class_id > 0 for s in strokes)
        for s in strokes:
            assert s.xy.dtype == np.float64
            assert s.xy.shape[1] == 2
            seen.add(s.class_id)
            for x, y in s.xy.astype(int):
                if 0 <= x < gt.shape[1] and 0 <= y < gt.shape[0] and gt[y, x] != 255:
                    assert gt[y, x] == s.class_id
    assert seen >= {0}
    assert len(seen) >= 3


def _xml(tmp_path: Path, body: str, name: str = "s.xml") -> Path:
    path = tmp_path / name
    path.write_text(f"<annotation><filename>x.jpg</filename>{body}</annotation>")
    return path


def test_scribble_tags_are_case_insensitive_and_size_is_optional(tmp_path: Path) -> None:
    body = "".join(
        f"<polygon><tag>{tag}</tag><point><X>1</X><Y>2.5</Y></point><point><X>3</X><Y>4</Y></point></polygon>"
        for tag in ("PLANE", " Monitor ", "tvmonitor", "Background", "bike")
    )
    strokes, size = read_scribble_xml(_xml(tmp_path, body + "<polygon><tag>cat</tag></polygon>"))
    assert size is None
    assert [s.class_id for s in strokes] == [1, 20, 20, 0, 2]  # the empty stroke is skipped
    assert np.array_equal(strokes[0].xy, [[1.0, 2.5], [3.0, 4.0]])


def test_scribble_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match=r"zebra\.xml.*'zebra'"):
        read_scribble_xml(_xml(tmp_path, "<polygon><tag>zebra</tag></polygon>", "zebra.xml"))
    with pytest.raises(LabelError, match=r"bad\.xml.*X = 'a'"):
        read_scribble_xml(_xml(tmp_path, "<polygon><tag>cat</tag><point><X>a</X><Y>1</Y></point></polygon>", "bad.xml"))
    dtd = tmp_path / "dtd.xml"
    dtd.write_text('<!DOCTYPE a [<!ENTITY e "x">]><annotation>&e;</annotation>')
    with pytest.raises(LabelError, match="DTD"):
        read_scribble_xml(dtd)
    with pytest.raises(LabelError, match="not valid XML"):
        read_scribble_xml(_xml(tmp_path, "<polygon>", "broken.xml"))


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) distance of points p (n, 2) to the segment a-b."""
    d = b - a
    t = np.clip(((p - a) @ d) / max(float(d @ d), 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[:, None] * d), axis=1)


@pytest.mark.parametrize("size", [56, 448])
def test_draw_strokes_stays_in_the_content_and_near_the_lines(toy: ToyDataset, size: int) -> None:
    total_outside = 0
    for image_id in toy.train_ids:
        strokes, (h, w) = read_scribble_xml(toy.root / "labels" / "scribbles" / f"{image_id}.xml")
        geom = fit_geometry(h, w, size)
        canvas, outside = draw_strokes(strokes, geom, width=3)
        assert canvas.shape == (size, size)
        labelled = canvas != 255
        assert not (labelled & ~geom.content_mask()).any()
        assert set(np.unique(canvas[labelled])) <= {s.class_id for s in strokes}
        ys, xs = np.nonzero(labelled)
        pixels = np.stack([xs, ys], axis=1).astype(np.float64)
        near = np.full(len(pixels), np.inf)
        for s in strokes:
            c = points_to_canvas(s.xy, geom)
            for a, b in zip(c, c[1:] if len(c) > 1 else c, strict=False):
                near = np.minimum(near, _segment_distance(pixels, a, b))
        assert near.max() <= 3 / 2 + 1  # half the line width, plus PIL's rounding
        xy = np.concatenate([s.xy for s in strokes])
        assert outside == int(((xy[:, 0] < -0.5) | (xy[:, 0] >= w - 0.5) | (xy[:, 1] < -0.5) | (xy[:, 1] >= h - 0.5)).sum())
        total_outside += outside
    assert total_outside == toy.summary["scribble_points_outside"] > 0


def test_draw_strokes_clips_lines_leaving_the_image() -> None:
    geom = fit_geometry(30, 40, 56)  # content rows 7..48, all columns
    canvas, outside = draw_strokes([Stroke(5, np.array([[-10.0, 10.0], [20.0, 10.0]]))], geom, width=1)
    assert outside == 1
    rows, cols = np.nonzero(canvas == 5)
    assert cols.min() == 0
    assert rows.min() >= geom.pad_top
    dot, _ = draw_strokes([Stroke(3, np.array([[5.0, 5.0]]))], geom, width=3)
    assert 1 <= (dot == 3).sum() <= 9


# --- points --------------------------------------------------------------------------------------


def test_read_points_json_from_make_toy(toy: ToyDataset) -> None:
    fg = read_points_json(toy.root / "labels" / "points.json")
    both = read_points_json(toy.root / "labels" / "points.json", background=toy.root / "labels" / "points_bg.json")
    raw_bg = json.loads((toy.root / "labels" / "points_bg.json").read_text())
    assert set(both) == set(toy.train_ids)
    for image_id, points in both.items():
        assert points[: len(fg[image_id])] == fg[image_id]
        assert [p.class_id for p in points[len(fg[image_id]) :]] == [0] * len(raw_bg[image_id])
        assert all(isinstance(p, Point) and p.class_id > 0 for p in fg[image_id])


def test_draw_points_drops_and_counts_clicks_outside(toy: ToyDataset) -> None:
    points = read_points_json(toy.root / "labels" / "points.json", background=toy.root / "labels" / "points_bg.json")
    dropped_total = 0
    for image_id, clicks in points.items():
        gt = _gt(toy, image_id)
        h, w = gt.shape
        geom = fit_geometry(h, w, 448)
        canvas, dropped = draw_points(clicks, geom)
        inside = [p for p in clicks if 0 <= p.x < w and 0 <= p.y < h]
        assert dropped == len(clicks) - len(inside)
        assert (canvas != 255).sum() == len({(p.x, p.y) for p in inside})  # upscaled: distinct clicks stay distinct
        for p in inside:
            rows, cols = _nearest_pixels(geom, p)
            assert (canvas[np.ix_(rows, cols)] == p.class_id).sum() == 1
        dropped_total += dropped
    assert dropped_total == toy.summary["clicks_outside"] > 0


def _nearest_pixels(geom: Geometry, p: Point) -> tuple[np.ndarray, np.ndarray]:
    """Independent reference: the content rows and columns whose centres, mapped back to the original
    image, lie nearest to the click (two of them on a tie)."""
    s = geom.canvas
    cols = (np.arange(s) - geom.pad_left + 0.5) * geom.width / geom.resized_width - 0.5
    rows = (np.arange(s) - geom.pad_top + 0.5) * geom.height / geom.resized_height - 0.5
    cols[: geom.pad_left] = cols[geom.pad_left + geom.resized_width :] = np.inf
    rows[: geom.pad_top] = rows[geom.pad_top + geom.resized_height :] = np.inf
    dx, dy = np.abs(cols - p.x), np.abs(rows - p.y)
    return np.flatnonzero(dy <= dy.min() + 1e-9), np.flatnonzero(dx <= dx.min() + 1e-9)


@pytest.mark.parametrize(("h", "w", "size", "step"), [(1000, 1400, 28, 100), (700, 500, 56, 20), (5, 7, 448, 1), (1, 3, 14, 1)])
def test_draw_points_never_loses_a_click(h: int, w: int, size: int, step: int) -> None:
    """Far-apart clicks (including the corners) each mark exactly the canvas pixel nearest to them."""
    geom = fit_geometry(h, w, size)
    xs, ys = np.arange(0, w, step), np.arange(0, h, step)
    xs, ys = np.unique([*xs, w - 1]), np.unique([*ys, h - 1])
    clicks = [Point(float(x), float(y), 1 + (i % 20)) for i, (x, y) in enumerate((x, y) for y in ys for x in xs)]
    outside = [Point(-1.0, 0.0, 3), Point(float(w), 0.0, 3), Point(0.0, h - 0.4, 3)]
    canvas, dropped = draw_points(clicks + outside, geom)
    assert dropped == len(outside)
    assert (canvas != 255).sum() == len(clicks)
    assert not ((canvas != 255) & ~geom.content_mask()).any()
    for p in clicks:
        rows, cols = _nearest_pixels(geom, p)
        assert (canvas[np.ix_(rows, cols)] == p.class_id).sum() == 1


@pytest.mark.parametrize(("h", "w", "size"), [(333, 250, 28), (500, 375, 42), (7, 5, 448), (1, 3, 14)])
def test_draw_points_keeps_clicks_on_the_outer_edge_of_the_image(h: int, w: int, size: int) -> None:
    """Clicks on the outermost half pixel (which rounding can push into the padding) stay on the content."""
    geom = fit_geometry(h, w, size)
    for x, y in [(-0.49, -0.49), (w - 0.51, h - 0.51), (-0.49, h - 0.51), (w - 0.51, -0.49)]:
        canvas, dropped = draw_points([Point(x, y, 4)], geom)
        assert dropped == 0
        assert (canvas == 4).sum() == 1
        assert (canvas == 4)[geom.content_mask()].sum() == 1


def test_draw_points_disks_and_overlaps() -> None:
    geom = Geometry(10, 20, 14, 28, 7, 0, 28)
    clicks = [Point(10.0, 5.0, 7), Point(0.0, 0.0, 9)]
    canvas, _ = draw_points(clicks, geom, radius=1)
    assert (canvas == 7).sum() == 5  # a plus-shaped disk of radius 1
    assert (canvas == 9).sum() == 3
    assert not ((canvas != 255) & ~geom.content_mask()).any()
    fg_first = [Point(4.0, 4.0, 12), Point(4.0, 4.0, 0)]
    canvas, _ = draw_points(fg_first, geom)
    assert (canvas == 12).sum() == 1
    assert (canvas == 0).sum() == 0
    empty, dropped = draw_points([], geom)
    assert (empty == 255).all()
    assert dropped == 0


def test_points_json_errors(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"a": [{"x": 1, "y": 2, "cls": 21, "rank": 1}]}))
    with pytest.raises(LabelError, match=r"p\.json, id a.*cls 21"):
        read_points_json(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(LabelError, match="holds a list"):
        read_points_json(path)
    good, bg = tmp_path / "g.json", tmp_path / "bg.json"
    good.write_text(json.dumps({"a": [{"x": 1, "y": 2, "cls": 3}]}))
    bg.write_text(json.dumps({"a": [{"x": 1, "y": 2, "cls": 4}]}))
    with pytest.raises(LabelError, match="background file"):
        read_points_json(good, background=bg)
    bg.write_text(json.dumps({"b": [{"x": 5, "y": 6}]}))
    assert read_points_json(good, background=bg) == {"a": [Point(1.0, 2.0, 3)], "b": [Point(5.0, 6.0, 0)]}


# --- image-level labels --------------------------------------------------------------------------


def test_cls_labels_with_string_and_integer_keys(toy: ToyDataset) -> None:
    by_str = read_cls_labels(toy.root / "labels" / "cls_labels.npy")
    by_int = read_cls_labels(toy.root / "labels" / "cls_labels_int.npy")
    assert set(by_str) == set(by_int) == set(toy.train_ids + toy.val_ids)
    for image_id, flags in by_str.items():
        assert flags.dtype == np.float32
        assert flags.shape == (20,)
        assert np.array_equal(by_int[image_id], flags)
        present = {c for c in np.unique(_gt(toy, image_id)) if 0 < c < 255}
        assert {i + 1 for i in np.flatnonzero(flags)} == present


def test_normalize_id() -> None:
    assert normalize_id(2007000032) == "2007_000032"
    assert normalize_id(np.int64(2011003276)) == "2011_003276"
    assert normalize_id(123) == "123"
    assert normalize_id(" 2007_000032 ") == "2007_000032"
    assert normalize_id(b"2008_000002") == "2008_000002"


def _save_npy_pickle(path: Path, obj: object, protocol: int = 3, rename: bool = False) -> None:
    """An object .npy written by hand; ``rename`` spells numpy's modules as numpy 1.x did."""
    arr = np.empty((), dtype=object)
    arr[()] = obj
    payload = pickle.dumps(arr, protocol=protocol)
    if rename:
        payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(arr))
        f.write(payload)


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


def test_cls_labels_old_numpy_files_and_refused_pickles(tmp_path: Path) -> None:
    flags = np.eye(20, dtype=np.float32)[4]
    old = tmp_path / "old.npy"
    _save_npy_pickle(old, {2007000032: flags, "2007_000033": flags.astype(np.float64)}, rename=True)
    assert b"numpy.core.multiarray" in old.read_bytes()
    labels = read_cls_labels(old)
    assert set(labels) == {"2007_000032", "2007_000033"}
    assert all(v.dtype == np.float32 and np.array_equal(v, flags) for v in labels.values())
    proto2 = tmp_path / "p2.npy"
    _save_npy_pickle(proto2, {"a": flags}, protocol=2)
    assert np.array_equal(read_cls_labels(proto2)["a"], flags)
    evil = tmp_path / "evil.npy"
    _save_npy_pickle(evil, {"a": _Evil()})
    with pytest.raises(LabelError, match=r"evil\.npy.*getcwd is not allowed"):
        read_cls_labels(evil)


def test_cls_labels_shape_and_type_errors(tmp_path: Path) -> None:
    path = tmp_path / "c.npy"
    np.save(path, {"a": np.zeros(21, np.float32)}, allow_pickle=True)
    with pytest.raises(LabelError, match=r"id a .*\(21,\).*no background slot"):
        read_cls_labels(path)
    np.save(path, np.zeros((3, 20), np.float32))
    with pytest.raises(LabelError, match="float32 array of shape"):
        read_cls_labels(path)
    np.save(path, np.array([1, 2], dtype=object), allow_pickle=True)
    with pytest.raises(LabelError, match="holds a ndarray"):
        read_cls_labels(path)
    with pytest.raises(LabelError, match="no image-level label file"):
        read_cls_labels(tmp_path / "absent.npy")
    buf = io.BytesIO()
    np.save(buf, {"a": np.zeros(20)}, allow_pickle=True)
    (tmp_path / "cut.npy").write_bytes(buf.getvalue()[:-10])
    with pytest.raises(LabelError, match=r"cut\.npy"):
        read_cls_labels(tmp_path / "cut.npy")


def test_masks_are_writable(toy: ToyDataset) -> None:
    """Callers may edit what they get (e.g. remap classes): every mode gives a writable array."""
    image_id = toy.train_ids[0]
    paths = [
        toy.voc_root / "SegmentationClass" / f"{image_id}.png",
        toy.root / "labels" / "pseudo_eps" / f"{image_id}.png",
        toy.root / "labels" / "gt_rgb" / f"{image_id}.png",
    ]
    for path in paths:
        mask = read_mask(path)
        mask[0, 0] = 7
        assert mask[0, 0] == 7

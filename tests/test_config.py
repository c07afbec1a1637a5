"""The workspace file and stage configs: defaults, the dataset's own masks as `gt`, bad values."""

import pytest

from pipeline.config import OFFICIAL_ITERATIONS, ExtractConfig, TrainConfig
from pipeline.errors import ConfigError
from pipeline.features.data import find_images
from pipeline.workspace import Workspace


def write(tmp_path, text: str):
    path = tmp_path / "ssvt.toml"
    path.write_text(text)
    return path


def test_gt_defaults_to_segmentation_class_aug_when_present(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "SegmentationClass").mkdir(parents=True)
    path = write(tmp_path, '[dataset]\nroot = "VOC2012"\n')
    assert Workspace.load(path).labels["gt"].path == root / "SegmentationClass"
    (root / "SegmentationClassAug").mkdir()
    gt = Workspace.load(path).labels["gt"]
    assert (gt.path, gt.kind) == (root / "SegmentationClassAug", "mask")


def test_folder_dataset_uses_its_masks_and_explicit_gt_wins(tmp_path):
    (tmp_path / "set" / "images").mkdir(parents=True)
    (tmp_path / "set" / "masks").mkdir()
    ws = Workspace.load(write(tmp_path, '[dataset]\nroot = "set"\nformat = "folder"\n'))
    assert ws.labels["gt"].path == tmp_path / "set" / "masks"
    explicit = '[dataset]\nroot = "set"\nformat = "folder"\n[labels.gt]\nkind = "mask"\npath = "other"\n'
    assert Workspace.load(write(tmp_path, explicit)).labels["gt"].path == tmp_path / "other"
    (tmp_path / "set" / "masks").rmdir()
    assert "gt" not in Workspace.load(write(tmp_path, '[dataset]\nroot = "set"\nformat = "folder"\n')).labels


def test_path_pair_split_file_of_the_toy_gives_the_same_images(toy):
    pairs = find_images(toy.voc_root, "train_pairs")
    bare = find_images(toy.voc_root, "train")
    assert [i.id for i in pairs] == [i.id for i in bare] == list(toy.train_ids)
    assert all(i.path.exists() for i in pairs)


def test_bad_workspace_and_config_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="needs `root`"):
        Workspace.load(write(tmp_path, "[dataset]\n"))
    with pytest.raises(ConfigError, match="format = 'coco'"):
        Workspace.load(write(tmp_path, '[dataset]\nroot = "x"\nformat = "coco"\n'))
    with pytest.raises(ConfigError, match="not valid TOML"):
        Workspace.load(write(tmp_path, "[dataset\n"))
    with pytest.raises(ConfigError, match="ssvt init"):
        Workspace.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="--size must be positive"):
        ExtractConfig(size=0)  # the patch multiple needs the backbone: tests/test_extract.py
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="step")
    assert ExtractConfig.from_dict(ExtractConfig(flip=True).to_dict()) == ExtractConfig(flip=True)
    with pytest.raises(ConfigError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"lr": 1e-3, "momentum": 0.9})


def test_training_length_defaults_to_the_official_iterations_or_follows_epochs():
    official = TrainConfig()
    assert (official.epochs, official.iterations, official.poly_power) == (None, None, 1.0)
    assert official.total_steps(1464) == official.total_steps(10) == OFFICIAL_ITERATIONS == 40_000
    assert official.warmup_steps(40_000) == 1500  # the official warmup_iters
    assert TrainConfig(iterations=100, min_steps=300).total_steps(1464) == 100  # min_steps is for epochs only
    assert TrainConfig(epochs=2, min_steps=0).total_steps(100) == 2 * 7  # ceil(100 / 16) steps per pass
    assert TrainConfig(epochs=1, min_steps=300).total_steps(100) == 300
    assert TrainConfig(iterations=100, warmup=0.29).warmup_steps(100) == 29
    assert TrainConfig(iterations=100, warmup=0.5, warmup_iters=15).warmup_steps(100) == 15  # replaces the fraction
    assert TrainConfig(iterations=100, warmup_iters=0).warmup_steps(100) == 0


def test_bad_training_length_and_schedule_values_are_named():
    with pytest.raises(ConfigError, match=r"epochs or iterations, not both \(got epochs=3, iterations=500\)"):
        TrainConfig(epochs=3, iterations=500)
    with pytest.raises(ConfigError, match="at least 1, got None and 0"):
        TrainConfig(iterations=0)
    with pytest.raises(ConfigError, match="warmup_iters 100 must be below the number of training steps, 100"):
        TrainConfig(iterations=100, warmup_iters=100)
    with pytest.raises(ConfigError, match="warmup_iters 40000 must be below the number of training steps, 40000"):
        TrainConfig(warmup_iters=40_000)
    epochs = TrainConfig(epochs=1, min_steps=0, warmup_iters=10)  # the number of steps is known only at training time
    assert epochs.warmup_steps(epochs.total_steps(200)) == 10
    with pytest.raises(ConfigError, match="warmup_iters 10 must be below the number of training steps, 7"):
        epochs.warmup_steps(epochs.total_steps(100))
    with pytest.raises(ConfigError, match="warmup_iters must be 0 or more, got -1"):
        TrainConfig(warmup_iters=-1)
    for power in (0.0, -1.0):
        with pytest.raises(ConfigError, match="poly_power must be positive"):
            TrainConfig(poly_power=power)


def test_train_config_written_by_an_older_version_still_loads():
    """Run folders before the official recipe stored 30 epochs, a 5 % warm-up and no iterations keys."""
    old = {"labels": "eps", "head": "bn-linear", "epochs": 30, "min_steps": 300, "batch_size": 16, "lr": 0.001,
           "weight_decay": 0.0001, "warmup": 0.05, "schedule": "poly", "pixels_per_image": None, "flip": True, "seed": 0,
           "device": "auto", "memory": "auto"}  # fmt: skip
    cfg = TrainConfig.from_dict(old)
    assert (cfg.epochs, cfg.iterations, cfg.warmup_iters) == (30, None, None)
    assert cfg.total_steps(1464) == 30 * 92
    assert cfg.warmup_steps(30 * 92) == 138
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def _workspace(tmp_path, text: str) -> Workspace:
    (tmp_path / "ssvt.toml").write_text(text)
    return Workspace.load(tmp_path / "ssvt.toml")


def test_unknown_workspace_keys_are_errors_naming_the_valid_ones(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown key `num_class` in \[dataset\] \(did you mean `num_classes`\?\); valid keys: root"
    ):
        _workspace(tmp_path, '[dataset]\nroot = "d"\nnum_class = 150\n')
    with pytest.raises(ConfigError, match=r"unknown key `trainig` in the file \(sections\).*valid keys: dataset, paths, labels"):
        _workspace(tmp_path, '[dataset]\nroot = "d"\n[trainig]\nlr = 1\n')
    with pytest.raises(ConfigError, match=r"unknown key `backgroud` in \[labels.point\] \(did you mean `background`\?\)"):
        _workspace(tmp_path, '[dataset]\nroot = "d"\n[labels.point]\nkind = "points-json"\npath = "p.json"\nbackgroud = "b"\n')
    with pytest.raises(ConfigError, match=r"unknown key `chache` in \[paths\]"):
        _workspace(tmp_path, '[dataset]\nroot = "d"\n[paths]\nchache = "c"\n')
    with pytest.raises(ConfigError, match=r"labels.gt must be a table"):
        _workspace(tmp_path, '[dataset]\nroot = "d"\n[labels]\ngt = "masks"\n')
    assert _workspace(tmp_path, '[dataset]\nroot = "d"\nnum_classes = 150\n').num_classes == 150


def test_the_shipped_templates_use_only_valid_keys(tmp_path):
    from pipeline.templates import INIT_TEMPLATE, TOY_WORKSPACE

    for text in (INIT_TEMPLATE, TOY_WORKSPACE):
        ws = _workspace(tmp_path, text)
        assert ws.num_classes == 21
        assert "gt" in ws.labels


def test_optional_ground_truth_can_be_switched_off(tmp_path):
    from pipeline.workspace import optional_label_source

    (tmp_path / "VOC2012" / "SegmentationClass").mkdir(parents=True)
    ws = _workspace(tmp_path, '[dataset]\nroot = "VOC2012"\n')
    assert optional_label_source("gt", ws) == ws.labels["gt"]
    for off in ("none", "None", "", None):
        assert optional_label_source(off, ws) is None
    assert optional_label_source("missing", ws) is None


def test_classes_name_the_classes_of_a_folder_dataset(tmp_path):
    from pipeline.training.evaluate import class_names

    (tmp_path / "classes.txt").write_text("ground\ntree\n\nsky\n")
    ws = _workspace(tmp_path, '[dataset]\nroot = "set"\nformat = "folder"\nclasses = "classes.txt"\n')
    assert (ws.classes, ws.num_classes) == (("ground", "tree", "sky"), 3)
    assert class_names(ws.num_classes, ws.classes) == ["ground", "tree", "sky"]
    assert class_names(4, ws.classes) == ["class_0", "class_1", "class_2", "class_3"]  # a head of another dataset
    ws = _workspace(tmp_path, '[dataset]\nroot = "set"\nformat = "folder"\nclasses = ["a", "b"]\nnum_classes = 2\n')
    assert (ws.classes, ws.num_classes) == (("a", "b"), 2)
    with pytest.raises(ConfigError, match=r"num_classes = 4 but classes \(classes.txt\) names 3 classes"):
        _workspace(tmp_path, '[dataset]\nroot = "set"\nclasses = "classes.txt"\nnum_classes = 4\n')
    with pytest.raises(ConfigError, match="num_classes = 151 but format 'ade20k' names 150 classes"):
        _workspace(tmp_path, '[dataset]\nroot = "ade"\nformat = "ade20k"\nnum_classes = 151\n')
    with pytest.raises(ConfigError, match=r"cannot read \[dataset\] classes = 'missing\.txt'"):
        _workspace(tmp_path, '[dataset]\nroot = "set"\nclasses = "missing.txt"\n')
    with pytest.raises(ConfigError, match=r"classes repeats \['a'\]"):
        _workspace(tmp_path, '[dataset]\nroot = "set"\nclasses = ["a", "b", "a"]\n')
    with pytest.raises(ConfigError, match=r"a list of names or the path of a classes\.txt"):
        _workspace(tmp_path, '[dataset]\nroot = "set"\nclasses = 3\n')
    voc = _workspace(tmp_path, '[dataset]\nroot = "VOC2012"\n')
    assert (voc.num_classes, class_names(voc.num_classes, voc.classes)[1]) == (21, "aeroplane")
    other = _workspace(tmp_path, '[dataset]\nroot = "VOC2012"\nnum_classes = 5\n')  # a VOC layout of other classes
    assert other.classes is None
    assert class_names(other.num_classes, other.classes) == [f"class_{i}" for i in range(5)]


def test_splits_that_would_be_the_same_images_are_refused(tmp_path):
    (tmp_path / "flat" / "images").mkdir(parents=True)
    (tmp_path / "flat" / "masks").mkdir()
    with pytest.raises(ConfigError, match=r"splits train, val, but .*flat has no per-split folders.*images/<split>/"):
        _workspace(tmp_path, '[dataset]\nroot = "flat"\nformat = "folder"\nsplits = ["train", "val"]\n')
    with pytest.raises(ConfigError, match="same images"):
        _workspace(tmp_path, '[dataset]\nroot = "flat"\nformat = "folder"\nval_split = "val"\n')
    with pytest.raises(ConfigError, match="same images"):
        _workspace(tmp_path, '[dataset]\nroot = "list.txt"\nformat = "list"\nsplits = ["a", "b"]\n')
    ws = _workspace(tmp_path, '[dataset]\nroot = "flat"\nformat = "folder"\n')  # one split by default
    assert (ws.splits, ws.train_split, ws.val_split) == (("train",), "train", None)
    one = '[dataset]\nroot = "flat"\nformat = "folder"\nsplits = ["all"]\ntrain_split = "all"\n'
    assert _workspace(tmp_path, one).splits == ("all",)
    (tmp_path / "flat" / "images" / "train").mkdir()
    (tmp_path / "flat" / "images" / "val").mkdir()
    ws = _workspace(tmp_path, '[dataset]\nroot = "flat"\nformat = "folder"\n')
    assert (ws.splits, ws.train_split, ws.val_split) == (("train", "val"), "train", "val")


def test_label_sources_may_name_a_mask_mapping(tmp_path):
    ws = _workspace(tmp_path, '[dataset]\nroot = "d"\n[labels.raw]\nkind = "mask"\npath = "ann"\nmapping = "ade20k"\n')
    assert ws.labels["raw"].mapping == "ade20k"
    with pytest.raises(ConfigError, match="mapping 'coco'; valid: ade20k, cityscapes"):
        _workspace(tmp_path, '[dataset]\nroot = "d"\n[labels.raw]\nkind = "mask"\npath = "ann"\nmapping = "coco"\n')


def test_the_init_template_documents_every_format_and_dataset_key():
    from pipeline.templates import INIT_TEMPLATE
    from pipeline.workspace import DATA_FORMATS, WORKSPACE_KEYS

    for word in (*DATA_FORMATS, *WORKSPACE_KEYS["dataset"], *WORKSPACE_KEYS["labels.*"], "classes.txt", "images/<split>/"):
        assert word in INIT_TEMPLATE, word

"""The workspace file and stage configs: defaults, the dataset's own masks as `gt`, bad values."""

import pytest

from pipeline.config import ExtractConfig, TrainConfig, Workspace
from pipeline.errors import ConfigError
from pipeline.features.data import find_images


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
    with pytest.raises(ConfigError, match="multiple of 14"):
        ExtractConfig(size=500)
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="step")
    assert ExtractConfig.from_dict(ExtractConfig(flip=True).to_dict()) == ExtractConfig(flip=True)
    with pytest.raises(ConfigError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"lr": 1e-3, "momentum": 0.9})


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
    from pipeline.config import optional_label_source

    (tmp_path / "VOC2012" / "SegmentationClass").mkdir(parents=True)
    ws = _workspace(tmp_path, '[dataset]\nroot = "VOC2012"\n')
    assert optional_label_source("gt", ws) == ws.labels["gt"]
    for off in ("none", "None", "", None):
        assert optional_label_source(off, ws) is None
    assert optional_label_source("missing", ws) is None

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

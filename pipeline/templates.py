"""The commented ``ssvt.toml`` files that ``ssvt init`` and ``ssvt make-toy`` write.

Their keys are the ones :class:`pipeline.workspace.Workspace` accepts; tests parse both.
"""

INIT_TEMPLATE = """\
# ssvt workspace: the dataset, where caches and runs go, and the label sources by name.
# Relative paths are relative to this file. Every setting can also be given as a command-line flag.

[dataset]
# A VOC root (the folder holding JPEGImages/, SegmentationClass/, ImageSets/Segmentation/),
# a folder with images/ (+ masks/) paired by file stem, or a plain folder of images.
root = "VOCdevkit/VOC2012"
format = "voc"                  # voc | folder | list | ade20k | cityscapes
splits = ["train_aug", "val"]   # ImageSets/Segmentation/<split>.txt; `ssvt extract` caches each
train_split = "train_aug"
val_split = "val"
num_classes = 21                # follows from `classes` or the format when left out
# classes = "classes.txt"       # names for reports and figures: a list ["road", "car"] or a file, one a line
#
# Other formats set their own ground truth (`gt`), class names and num_classes:
#   format = "ade20k"       root = "ADEChallengeData2016": images/{training,validation}/*.jpg, annotations/
#                           (0 = ignore, classes 1..150 read as 0..149); splits = ["training", "validation"]
#   format = "cityscapes"   root = "cityscapes": leftImg8bit/<split>/<city>/*_leftImg8bit.png, gtFine/
#                           (*_labelTrainIds.png, else *_labelIds.png mapped to the 19 trainIds)
#   format = "folder"       images/<split>/ + masks/<split>/ for each split; a folder with images/ + masks/
#                           only is one split: splits = ["train"] and no val_split

[paths]
cache = "cache"                 # feature stores: cache/<model>-<size>-<layers>/<split>.zarr
runs = "runs"                   # one folder per `ssvt train-head` run

# Label sources, used by `ssvt train-head --labels NAME`. Kinds: mask (palette or single-channel PNGs,
# 255 = ignore), rgb-mask, scribble-xml (ScribbleSup), scribble-png, points-json ("What's the Point",
# optional `background` file), cls-labels (cls_labels.npy). Without a [labels.gt] entry, `gt` is the
# dataset's SegmentationClassAug/ when present, else SegmentationClass/ (or masks/ for folders,
# annotations/ for ADE20K, gtFine/ for Cityscapes). `mapping = "ade20k"` or "cityscapes" reads a mask
# source in that dataset's ids (ADE20K 0 = ignore; Cityscapes labelIds -> trainIds).
[labels.gt]
kind = "mask"
path = "VOCdevkit/VOC2012/SegmentationClassAug"

# [labels.scribble]
# kind = "scribble-xml"
# path = "scribble_annotation/pascal_2012"

# [labels.point]
# kind = "points-json"
# path = "whats_the_point/pascal2012_trainval_main.json"
# background = "whats_the_point/pascal2012_trainval_bg.json"

# [labels.eps]
# kind = "mask"
# path = "EPS/result/cam_png"
"""

#: The workspace `ssvt make-toy` writes next to its data (the label sources of the toy).
TOY_WORKSPACE = """\
# ssvt workspace (written by `ssvt make-toy`): the dataset, where caches and runs go, and the label sources.
# Relative paths are relative to this file.

[dataset]
root = "VOC2012"                # a VOC root: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/
format = "voc"
splits = ["train", "val"]       # ImageSets/Segmentation/<split>.txt
train_split = "train"
val_split = "val"
num_classes = 21

[paths]
cache = "cache"                 # feature stores
runs = "runs"                   # one folder per training run

# Label sources by name (`--labels NAME`). Kinds: mask (PNG class ids, 255 = ignore), scribble-xml
# (ScribbleSup), points-json ("What's the Point", + background clicks), cls-labels (cls_labels.npy).
[labels.gt]
kind = "mask"                   # the full ground truth: the upper bound
path = "VOC2012/SegmentationClass"

[labels.scribble]
kind = "scribble-xml"           # one stroke per object and 1-2 background strokes, short tags
path = "labels/scribbles"

[labels.point]
kind = "points-json"            # one click per object ...
path = "labels/points.json"
background = "labels/points_bg.json"   # ... plus 1-2 background clicks

[labels.seam]
kind = "mask"                   # SEAM-like pseudo-masks from image-level labels (poorer)
path = "labels/pseudo_seam"

[labels.eps]
kind = "mask"                   # EPS-like pseudo-masks (better)
path = "labels/pseudo_eps"

[labels.vl]
kind = "mask"                   # zero-shot vision-language masks, 255 = low confidence
path = "labels/vl"

[labels.cls]
kind = "cls-labels"             # image-level labels: id -> 20 multi-hot, no background slot
path = "labels/cls_labels.npy"
"""

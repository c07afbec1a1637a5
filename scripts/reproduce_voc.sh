#!/usr/bin/env bash
# Reproduce the PASCAL VOC 2012 tables of Lee, Kang, Shim (arXiv 2401.12535) with ssvt: frozen
# DINOv2 ViT-L/14 + a linear head trained on GT, scribbles, points, SEAM, EPS and zero-shot
# vision-language masks. What each step reproduces, the data it needs and the cost: docs/reproduce.md.
#
# Usage (on a GPU machine with the data in place; nothing here runs in CI):
#   VOC_ROOT=/data/VOCdevkit/VOC2012 SEAM=/data/SEAM/out_rw ... scripts/reproduce_voc.sh
#   scripts/reproduce_voc.sh --dry-run      # or DRY_RUN=1: print ssvt.toml and the commands, run nothing
#
# Every setting below can be overridden from the environment. The script writes $WORK/ssvt.toml from
# them (and refuses to replace a different one), then runs every step inside $WORK. A rerun resumes:
# `ssvt extract` finishes missing shards only and `ssvt ablate` trains only the missing cells.
set -euo pipefail

# --- data (relative paths are taken from the folder the script is started in) ---
VOC_ROOT=${VOC_ROOT:-data/VOCdevkit/VOC2012}       # JPEGImages/, SegmentationClassAug/, ImageSets/Segmentation/{train_aug,train,val}.txt
SCRIBBLES=${SCRIBBLES:-data/scribbles/pascal_2012} # ScribbleSup: one XML per image
POINTS=${POINTS:-data/whats_the_point/pascal2012_trainval_main.json}   # "What's the Point" clicks (foreground)
POINTS_BG=${POINTS_BG-data/whats_the_point/pascal2012_trainval_bg.json}   # background clicks; empty: none
SEAM=${SEAM:-data/seam/out_rw}                     # SEAM pseudo-masks: PNGs of class ids, one per train_aug image
EPS=${EPS:-data/eps/cam_png}                       # EPS pseudo-masks: the same format
VL=${VL:-data/clip_es}                             # CLIP-ES-like zero-shot masks: PNGs 0-20, 255 = low confidence
WEIGHTS=${WEIGHTS:-}                               # dinov2_vitl14_pretrain.pth; empty: the torch hub / HF cache

# --- where the results go, and the recipe ---
WORK=${WORK:-ssvt-voc}                  # ssvt.toml, cache/ (features, label sets), ablations/
MODEL=${MODEL:-dinov2_vitl14}
SIZE=${SIZE:-448}                       # canvas side of the cache (longer image side, padded to a square)
LABELS=${LABELS:-gt,scribble,point,seam,eps,vl}
HEADS=${HEADS:-bn-linear,linear}
SEEDS=${SEEDS:-3}
ITERATIONS=${ITERATIONS:-40000}         # the official DINOv2 schedule (batch 16, 1,500 warm-up steps)
TRAIN_SPLIT=${TRAIN_SPLIT:-train_aug}
VAL_SPLIT=${VAL_SPLIT:-val}
SCORE_SPLIT=${SCORE_SPLIT-train}       # where SEAM/EPS/VL are scored themselves (the papers' VOC train); empty: TRAIN_SPLIT
MS=${MS:-1}                             # 1: also the "+ms" upper bound (last-4-blocks cache, multi-scale test)
DEVICE=${DEVICE:-auto}
RANDOM_INIT=${RANDOM_INIT:-0}           # 1: random backbone (smoke tests of the recipe on `ssvt make-toy` data only)
DRY_RUN=${DRY_RUN:-0}

for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $arg (only --dry-run)" >&2; exit 2 ;;
    esac
done

abs() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }
has_label() { [[ ",$LABELS," == *",$1,"* ]]; }
run() {  # print the command (quoted only where needed), then run it unless DRY_RUN=1
    local a line="+"
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./,=:+-]+$ ]]; then line+=" $a"; else line+=" $(printf '%q' "$a")"; fi
    done
    echo "$line"
    if [[ $DRY_RUN != 1 ]]; then "$@"; fi
}

SUFFIX=""
EXTRACT=(ssvt extract --model "$MODEL" --size "$SIZE" --device "$DEVICE")
if [[ $RANDOM_INIT == 1 ]]; then
    SUFFIX="-random"
    EXTRACT+=(--random-init)
elif [[ -n $WEIGHTS ]]; then
    EXTRACT+=(--weights "$(abs "$WEIGHTS")")
fi
LAST="$MODEL-$SIZE-last$SUFFIX"     # cache folder names (cache_layout.md, "Where it lives")
LAST4="$MODEL-$SIZE-last4$SUFFIX"
[[ -n $SCORE_SPLIT ]] || SCORE_SPLIT=$TRAIN_SPLIT
TRAIN=(--iterations "$ITERATIONS" --device "$DEVICE")

BACKGROUND=""
[[ -z $POINTS_BG ]] || BACKGROUND="background = \"$(abs "$POINTS_BG")\""
TOML=$(cat <<EOF
# Written by scripts/reproduce_voc.sh (docs/reproduce.md).
[dataset]
root = "$(abs "$VOC_ROOT")"
format = "voc"
splits = ["$TRAIN_SPLIT", "$VAL_SPLIT"]
train_split = "$TRAIN_SPLIT"
val_split = "$VAL_SPLIT"

[labels.gt]
kind = "mask"
path = "$(abs "$VOC_ROOT")/SegmentationClassAug"

[labels.scribble]
kind = "scribble-xml"
path = "$(abs "$SCRIBBLES")"

[labels.point]
kind = "points-json"
path = "$(abs "$POINTS")"
$BACKGROUND

[labels.seam]
kind = "mask"
path = "$(abs "$SEAM")"

[labels.eps]
kind = "mask"
path = "$(abs "$EPS")"

[labels.vl]
kind = "mask"
path = "$(abs "$VL")"
EOF
)

check_inputs() {
    local missing=() p
    for p in JPEGImages SegmentationClassAug "ImageSets/Segmentation/$TRAIN_SPLIT.txt" \
        "ImageSets/Segmentation/$VAL_SPLIT.txt" "ImageSets/Segmentation/$SCORE_SPLIT.txt"; do
        [[ -e $VOC_ROOT/$p ]] || missing+=("VOC_ROOT: $VOC_ROOT/$p")
    done
    has_label scribble && { [[ -e $SCRIBBLES ]] || missing+=("SCRIBBLES: $SCRIBBLES"); }
    has_label point && { [[ -e $POINTS ]] || missing+=("POINTS: $POINTS"); }
    has_label point && [[ -n $POINTS_BG ]] && { [[ -e $POINTS_BG ]] || missing+=("POINTS_BG: $POINTS_BG"); }
    has_label seam && { [[ -e $SEAM ]] || missing+=("SEAM: $SEAM"); }
    has_label eps && { [[ -e $EPS ]] || missing+=("EPS: $EPS"); }
    has_label vl && { [[ -e $VL ]] || missing+=("VL: $VL"); }
    [[ $RANDOM_INIT == 1 || -z $WEIGHTS || -e $WEIGHTS ]] || missing+=("WEIGHTS: $WEIGHTS")
    if ((${#missing[@]})); then
        printf 'missing input (set the variable at the top of %s):\n' "$0" >&2
        printf '  %s\n' "${missing[@]}" >&2
        exit 1
    fi
}

if [[ $DRY_RUN == 1 ]]; then
    echo "# dry run: would write $WORK/ssvt.toml:"
    printf '%s\n' "$TOML" | sed 's/^/#   /'
else
    check_inputs
    mkdir -p "$WORK"
    if [[ -e $WORK/ssvt.toml ]] && [[ $(cat "$WORK/ssvt.toml") != "$TOML" ]]; then
        echo "$WORK/ssvt.toml exists with other settings; remove it or choose another WORK" >&2
        exit 1
    fi
    printf '%s\n' "$TOML" >"$WORK/ssvt.toml"
fi
echo "+ cd $WORK"
[[ $DRY_RUN == 1 ]] || cd "$WORK"

# 1. Features, once: the last block ("lin" head), with the flipped view for training.
run "${EXTRACT[@]}" --layers last --split "$TRAIN_SPLIT" --flip
run "${EXTRACT[@]}" --layers last --split "$VAL_SPLIT"
[[ $SCORE_SPLIT == "$TRAIN_SPLIT" ]] || run "${EXTRACT[@]}" --layers last --split "$SCORE_SPLIT"
if [[ $MS == 1 ]]; then # the last 4 blocks, concatenated ("+ms" head)
    run "${EXTRACT[@]}" --layers last4 --split "$TRAIN_SPLIT" --flip
    run "${EXTRACT[@]}" --layers last4 --split "$VAL_SPLIT"
fi

# 2. The pseudo-labels themselves against ground truth (the paper's "pseudo-label itself" row).
for name in seam eps vl; do
    if has_label "$name"; then
        run ssvt score-labels "$name" --store "cache/$LAST/$SCORE_SPLIT.zarr"
    fi
done

# 3. Label types x heads x seeds, trained on the cache, evaluated with the official "lin" pipeline.
run ssvt ablate --name voc-labels --labels "$LABELS" --heads "$HEADS" --features "$LAST" --seeds "$SEEDS" \
    --rows labels --cols heads --protocol lin "${TRAIN[@]}"

# 4. The "+ms" upper bound: full ground truth, last 4 blocks, multi-scale + flip test.
if [[ $MS == 1 ]]; then
    run ssvt ablate --name voc-gt-ms --labels gt --heads bn-linear --features "$LAST4" --seeds "$SEEDS" \
        --rows labels --cols heads --protocol ms "${TRAIN[@]}"
fi

cat <<EOF

Tables (paper's numbers beside each cell: docs/reproduce.md):
  $WORK/ablations/voc-labels/table.md   label types x heads, "lin" mIoU, mean ± std over $SEEDS seeds
                                        (+ the labels' own mIoU on $TRAIN_SPLIT); results.csv, table.png
  $WORK/ablations/voc-labels/cells/*/   one run per cell: metrics.lin.json, metrics.json (cache proxy)
EOF
[[ $MS != 1 ]] || echo "  $WORK/ablations/voc-gt-ms/table.md    GT, last 4 blocks, \"+ms\" mIoU"
echo "  pseudo-labels themselves ($SCORE_SPLIT): printed above; again with: ssvt info $WORK/cache/$LAST/$SCORE_SPLIT.zarr"

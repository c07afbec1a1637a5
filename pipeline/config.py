"""Every stage config in one place: frozen dataclasses, checked when built, written into run folders.

Usage::

    cfg = ExtractConfig(model="dinov2_vitl14", size=448, layers="last")
    TrainConfig(labels="eps", head="bn-linear").to_dict()     # written into every run folder
    TrainConfig.from_dict(json.loads(text)["train"])          # a run folder's settings back

Head names are checked against their registry (:mod:`pipeline.heads`). The ``ssvt.toml`` workspace
(dataset, cache and runs folders, label sources) is :mod:`pipeline.workspace`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Self

from pipeline.cache.geometry import IGNORE
from pipeline.errors import ConfigError
from pipeline.heads import DEFAULT_HEAD, check_head

#: Default resolution of PNG figures, dots per inch.
DPI = 150


class ConfigDict:
    """``to_dict``/``from_dict`` for flat dataclasses, so configs can be written into artifacts."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys are {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class ExtractConfig(ConfigDict):
    """Settings of one ``ssvt extract`` run.

    ``layers`` is "last", "last4" or comma-separated block indices ("8,9,10,11"). ``random_init``
    builds the backbone without pretrained weights (tests, the offline demo); ``overrides`` change
    the architecture (tests build ``{"num_hidden_layers": 2}`` models). ``size`` must be a multiple of
    the model's patch size, which this module cannot know: :func:`pipeline.features.extract.resolved_patch`
    checks it, before anything is extracted.
    """

    model: str = "dinov2_vitl14"
    size: int = 448
    layers: str = "last"
    flip: bool = False
    weights: str | None = None
    random_init: bool = False
    seed: int = 0
    overrides: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    images_per_shard: int | None = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.size <= 0:
            raise ConfigError(f"--size must be positive, got {self.size}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be 0 or more, got {self.workers}")
        if self.images_per_shard is not None and self.images_per_shard < 1:
            raise ConfigError(f"images per shard must be at least 1, got {self.images_per_shard}")
        if self.random_init and self.weights:
            raise ConfigError("--random-init and --weights exclude each other")

    @property
    def views(self) -> tuple[str, ...]:
        return ("original", "hflip") if self.flip else ("original",)


SCHEDULES = ("cosine", "poly")
#: The official DINOv2 linear segmentation recipe (mmseg ``IterBasedRunner``): 40,000 iterations,
#: the first 1,500 of them warming up.
OFFICIAL_ITERATIONS = 40_000
OFFICIAL_WARMUP_ITERS = 1_500


@dataclass(frozen=True)
class TrainConfig(ConfigDict):
    """Settings of one ``ssvt train-head`` run (AdamW, linear warm-up, then cosine or poly decay).

    The defaults are the official DINOv2 linear recipe: ``OFFICIAL_ITERATIONS`` optimiser steps of 16
    images, lr 1e-3, weight decay 1e-4, poly decay with power 1, warm-up over the first 1,500 steps
    (``warmup`` 0.0375 of 40,000). ``iterations`` gives the number of steps; ``epochs`` instead gives
    passes over the labelled images, raised to at least ``min_steps`` steps (small datasets;
    ``min_steps`` applies in epochs mode only). Setting both is an error; neither means the official
    40,000 iterations. ``warmup`` is a fraction of the steps, ``warmup_iters`` (when set, it replaces
    ``warmup``) a number of steps. The schedule follows mmcv: the decay runs over all steps, warm-up
    included, and the linear warm-up multiplies it (:func:`pipeline.training.train.lr_lambda`).
    ``pixels_per_image`` trains dense labels on a random subset of labelled pixels per image (None:
    all); sparse labels always use only their labelled pixels. ``flip`` uses the cached flipped view
    as augmentation when the store has one. ``memory`` is "auto" (features in RAM or GPU memory when
    they fit, else streamed); "ram" and "stream" force one path (tests and benchmarks; the CLI never
    asks the user). ``tensorboard`` also writes TensorBoard event files into the run folder (needs the
    ``tensorboard`` package). Run folders of older versions (``epochs`` 30, ``warmup`` 0.05, no ``iterations``,
    ``warmup_iters`` or ``poly_power``) still load with :meth:`from_dict`; the missing keys take
    today's defaults, so such a config reads ``poly_power`` 1.0 although those runs decayed with 0.9.
    """

    labels: str = "gt"
    head: str = DEFAULT_HEAD
    epochs: int | None = None
    iterations: int | None = None
    min_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = OFFICIAL_WARMUP_ITERS / OFFICIAL_ITERATIONS
    warmup_iters: int | None = None
    schedule: str = "poly"
    poly_power: float = 1.0
    pixels_per_image: int | None = None
    flip: bool = True
    seed: int = 0
    device: str = "auto"
    memory: str = "auto"
    tensorboard: bool = False

    def __post_init__(self) -> None:
        check_head(self.head)
        if self.epochs is not None and self.iterations is not None:
            raise ConfigError(f"give epochs or iterations, not both (got epochs={self.epochs}, iterations={self.iterations})")
        if (self.epochs is not None and self.epochs < 1) or (self.iterations is not None and self.iterations < 1):
            raise ConfigError(f"epochs and iterations must be at least 1, got {self.epochs} and {self.iterations}")
        if self.batch_size < 1 or self.min_steps < 0:
            raise ConfigError(f"batch size must be at least 1 and min_steps 0 or more, got {self.batch_size}, {self.min_steps}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"learning rate must be positive and weight decay non-negative, got {self.lr}, {self.weight_decay}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warm-up is a fraction of training in [0, 1), got {self.warmup}")
        if self.warmup_iters is not None:
            if self.warmup_iters < 0:
                raise ConfigError(f"warmup_iters must be 0 or more, got {self.warmup_iters}")
            if self.epochs is None:  # the number of steps is known now
                self.warmup_steps(self.total_steps(0))
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule {self.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if not self.poly_power > 0:
            raise ConfigError(f"poly_power must be positive, got {self.poly_power}")
        if self.pixels_per_image is not None and self.pixels_per_image < 1:
            raise ConfigError(f"pixels per image must be at least 1, got {self.pixels_per_image}")
        if self.memory not in ("auto", "ram", "stream"):
            raise ConfigError(f"memory must be auto, ram or stream, got {self.memory!r}")

    def total_steps(self, n_images: int) -> int:
        """Optimiser steps of a run on ``n_images`` labelled images: ``iterations`` (default
        ``OFFICIAL_ITERATIONS``), or ``epochs`` passes of ``batch_size`` images but at least ``min_steps``."""
        if self.epochs is None:
            return OFFICIAL_ITERATIONS if self.iterations is None else self.iterations
        return max(self.epochs * math.ceil(n_images / self.batch_size), self.min_steps)

    def warmup_steps(self, total: int) -> int:
        """Warm-up steps of a run of ``total`` steps: ``warmup_iters``, else the fraction ``warmup`` of
        ``total`` (rounded down). ConfigError when ``warmup_iters`` is not below ``total``."""
        if self.warmup_iters is None:
            return int(self.warmup * total + 1e-9)  # float products such as 0.29 * 100 fall just below the integer
        if self.warmup_iters >= total:
            raise ConfigError(
                f"warmup_iters {self.warmup_iters} must be below the number of training steps, {total}; "
                "lower --warmup-iters or train longer"
            )
        return self.warmup_iters


@dataclass(frozen=True)
class FinetuneConfig(ConfigDict):
    """What ``ssvt finetune`` adds to a :class:`TrainConfig`: the backbone trains too.

    ``backbone_lr`` is the backbone's AdamW rate (its own parameter group; the head keeps
    ``TrainConfig.lr``; both follow the same schedule). ``layer_decay`` < 1 scales it per block: block i of
    ``depth`` gets ``backbone_lr * layer_decay ** (depth - 1 - i)``, the embeddings ``layer_decay ** depth``,
    the final norm ``backbone_lr``; 1.0 is off. ``grad_checkpointing`` recomputes each block in the
    backward pass (None: on CUDA only). ``amp`` runs the backbone under bf16 (fp16 with a gradient
    scaler on GPUs without bf16) autocast on CUDA; the CPU always trains in fp32. ``workers`` decode images.
    """

    backbone_lr: float = 1e-5
    layer_decay: float = 1.0
    grad_checkpointing: bool | None = None
    amp: bool = True
    workers: int = 2

    def __post_init__(self) -> None:
        if not self.backbone_lr >= 0:
            raise ConfigError(f"backbone_lr must be 0 or more, got {self.backbone_lr}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay must be in (0, 1] (1.0 = off), got {self.layer_decay}")
        if self.workers < 0:
            raise ConfigError(f"workers must be 0 or more, got {self.workers}")


@dataclass(frozen=True)
class KMeansVizConfig(ConfigDict):
    """Settings of one ``ssvt kmeans-viz`` run.

    ``ids`` picks the images (in that order); otherwise ``n`` images are drawn at random with ``seed``
    among the extracted ones (and, with ground truth, among those that have a mask), shown in store
    order. ``seed`` also seeds K-means. ``normalize`` L2-normalises tokens before clustering; ``joint``
    fits one K-means over all chosen images. ``view`` is the store view (0 = original canvas; a
    mirrored view is mirrored back). ``num_classes`` is for scoring; ``dpi`` for the PNG figure.
    """

    ks: tuple[int, ...] = (2, 4, 6)
    ids: tuple[str, ...] | None = None
    n: int = 4
    seed: int = 0
    joint: bool = False
    normalize: bool = True
    pca: bool = True
    view: int = 0
    n_init: int = 4
    num_classes: int = 21
    dpi: int = DPI

    def __post_init__(self) -> None:
        # Lists arrive from JSON (from_dict) and from the CLI; store tuples so the config stays hashable.
        object.__setattr__(self, "ks", tuple(self.ks))
        if self.ids is not None:
            object.__setattr__(self, "ids", tuple(self.ids))
        if not self.ks:
            raise ConfigError("ks must name at least one number of clusters, e.g. 2,4,6")
        bad = [k for k in self.ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < IGNORE]
        if bad:
            raise ConfigError(f"every K must be an integer in [1, {IGNORE - 1}] (cluster maps are palette PNGs), got {bad}")
        if len(set(self.ks)) != len(self.ks):
            raise ConfigError(f"ks repeats a value: {list(self.ks)}")
        if self.ids is not None:
            if not self.ids:
                raise ConfigError("ids is empty; leave it out to draw n random images")
            dupes = sorted({i for i in self.ids if self.ids.count(i) > 1})
            if dupes:
                raise ConfigError(f"ids repeat: {dupes[:5]}")
        if self.n < 1:
            raise ConfigError(f"n must be at least 1, got {self.n}")
        if self.view < 0:
            raise ConfigError(f"view must be 0 or more, got {self.view}")
        if self.n_init < 1:
            raise ConfigError(f"n_init must be at least 1, got {self.n_init}")
        if self.num_classes < 1:
            raise ConfigError(f"num_classes must be at least 1, got {self.num_classes}")
        if not 10 <= self.dpi <= 1200:
            raise ConfigError(f"dpi must be between 10 and 1200, got {self.dpi}")


@dataclass(frozen=True)
class PseudoMaskConfig(ConfigDict):
    """Settings of one ``ssvt pseudo-masks`` run (the method: :mod:`pipeline.training.pseudo_masks`).

    The classifier trains like a head (AdamW, warm-up, poly decay) for ``epochs`` or ``min_steps``.
    ``threshold`` is the background threshold on max-normalised CAMs (None: chosen on the training
    split's ground truth when given, among up to ``search_images`` images, else the default);
    ``band`` around it is left 255. ``kmeans`` > 0 refines with that many clusters per image.
    """

    labels: str = "cls"
    out_labels: str = "cam"
    pooling_r: float = 5.0
    epochs: int = 30
    min_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    threshold: float | None = None
    band: float = 0.05
    kmeans: int = 0
    min_share: float = 0.5
    search_images: int = 300
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.out_labels or "/" in self.out_labels or self.out_labels == self.labels:
            raise ConfigError(f"--out-labels must be a new label set name, got {self.out_labels!r}")
        if self.pooling_r <= 0:
            raise ConfigError(f"pooling r must be positive, got {self.pooling_r}")
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0 or self.search_images < 1:
            raise ConfigError("epochs, batch size and search images must be at least 1, min steps at least 0")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"learning rate must be positive and weight decay non-negative, got {self.lr}, {self.weight_decay}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ConfigError(f"threshold is in (0, 1) on max-normalised class maps, got {self.threshold}")
        if not 0 <= self.band < 0.5:
            raise ConfigError(f"band must be in [0, 0.5), got {self.band}")
        if self.kmeans < 0 or not 0 < self.min_share <= 1:
            raise ConfigError(
                f"kmeans must be 0 (off) or a cluster count, min share in (0, 1]; got {self.kmeans}, {self.min_share}"
            )


#: Label sets compared by the demo, in table order: names of the toy workspace, and ``cam``, the label
#: set the demo makes itself from the image-level ``cls`` labels (``DemoConfig.pseudo_masks``).
DEMO_LABELS = ("gt", "scribble", "point", "eps", "seam", "cam", "vl")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the tour. The defaults took 2 min 18-24 s on 2 quiet AMD EPYC cores (ViT-S/14 at 224, random
    init; BENCHMARKS.md, section 4), of which the ``cam`` row (``pseudo_masks`` and its head) 12 s."""

    n_train: int = 96
    n_val: int = 32
    model: str = "dinov2_vits14"
    size: int = 224
    labels: tuple[str, ...] = DEMO_LABELS
    # A higher learning rate and fewer steps than the DINOv2 protocol, and dense labels trained on a
    # random 1,024 pixels per image: the full-resolution loss dominates head training on a CPU.
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-2, epochs=1, min_steps=200, batch_size=16, pixels_per_image=1024)
    )
    # The image-level row: CAM pseudo-masks made from ``cls`` (its classifier trained like ``train``),
    # written as label set ``out_labels``; made only when ``labels`` names it.
    pseudo_masks: PseudoMaskConfig = field(
        default_factory=lambda: PseudoMaskConfig(labels="cls", out_labels="cam", lr=1e-2, epochs=1, min_steps=200)
    )
    kmeans_images: int = 4
    seed: int = 0


ABLATION_AXES = ("labels", "heads", "features", "seeds")


@dataclass(frozen=True)
class AblateConfig(ConfigDict):
    """Settings of one ``ssvt ablate`` grid: every label set x head x features (cache folder) x seed.

    ``train`` holds the training settings shared by all cells (its labels, head and seed are set per
    cell). ``rows`` and ``cols`` choose the table's axes; the axes left out must have one value (seeds
    are averaged). ``features`` empty means the workspace's only cache. ``protocol`` evaluates every
    cell with "cache" (the proxy, during training) or, afterwards and together, "lin" or "ms".
    """

    name: str = "grid"
    labels: tuple[str, ...] = ("gt",)
    heads: tuple[str, ...] = (DEFAULT_HEAD,)
    features: tuple[str, ...] = ()
    seeds: int = 1
    rows: str = "labels"
    cols: str = "heads"
    protocol: str = "cache"
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for head in self.heads:
            check_head(head)
        if not self.labels or not self.heads or self.seeds < 1:
            raise ConfigError("an ablation needs at least one label set, one head and one seed")
        if not self.name or any(c in self.name for c in "/\\"):
            raise ConfigError(f"--name must be a plain folder name, got {self.name!r}")
        if self.rows not in ABLATION_AXES or self.cols not in ABLATION_AXES or self.rows == self.cols:
            axes = ", ".join(ABLATION_AXES)
            raise ConfigError(f"--rows and --cols are two different axes of {axes}; got {self.rows}, {self.cols}")
        sizes = {"labels": len(self.labels), "heads": len(self.heads), "features": max(1, len(self.features))}
        mixed = [axis for axis, n in sizes.items() if n > 1 and axis not in (self.rows, self.cols)]
        if mixed:
            raise ConfigError(f"the table would average over {', '.join(mixed)}; make it --rows or --cols")
        if self.protocol not in ("cache", "lin", "ms"):
            raise ConfigError(f"protocol {self.protocol!r}; valid: cache, lin, ms")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AblateConfig:
        data = dict(data)
        train = data.pop("train", None)
        for key in ("labels", "heads", "features"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data, train=TrainConfig.from_dict(train) if train else TrainConfig())


#: The keys ``ssvt.toml`` may hold, per section (``labels.*`` is every ``[labels.NAME]`` table).

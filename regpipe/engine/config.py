"""The settings of one training run: the run's own, then one small dataclass per algorithm.

The CLI's option groups map one to one onto these dataclasses (``regpipe train --help``); each checks
its own values when it is built, so a bad value is named before any data is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from regpipe.engine.schedule import check_plateau

__all__ = [
    "CascadeConfig",
    "CutMixConfig",
    "CutOutConfig",
    "GradualConfig",
    "InvarianceConfig",
    "LossDeltaConfig",
    "LossOrderConfig",
    "MixUpConfig",
    "PatchUpConfig",
    "ReplicationConfig",
    "SaliencyConfig",
    "SignConfig",
    "SumConfig",
    "TrainConfig",
    "check_val_resize",
    "default_val_resize",
]

MixMode = Literal["group", "permute"]


def _positive_int(owner: str, name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


def _finite(owner: str, name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}], got {value!r}")


def _mode(owner: str, value: str) -> None:
    if value not in ("group", "permute"):
        raise ValueError(f"{owner}.mode must be 'group' or 'permute', got {value!r}")


def _names(owner: str, name: str, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name} must name at least one module, got {value!r}")


@dataclass(frozen=True)
class SumConfig:
    """``sum``: Sum Augmentation with a fixed number of groups ``k``."""

    k: int = 4
    mode: MixMode = "group"

    def __post_init__(self) -> None:
        _positive_int("sum", "k", self.k)
        _mode("sum", self.mode)


@dataclass(frozen=True)
class CascadeConfig:
    """``cascade``: stages of decreasing ``k``, each until the validation accuracy stops improving."""

    stages: tuple[int, ...] = (4, 2, 1)
    patience: int = 3
    stop_at: int = 1
    mode: MixMode = "group"

    def __post_init__(self) -> None:
        if not self.stages or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.stages) \
                or any(a <= b for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"cascade.stages must be strictly decreasing integers >= 1, got {self.stages!r}")
        _positive_int("cascade", "patience", self.patience)
        _positive_int("cascade", "stop_at", self.stop_at)
        if not any(k >= self.stop_at for k in self.stages):
            raise ValueError(f"cascade.stop_at={self.stop_at} leaves none of the stages {self.stages}")
        _mode("cascade", self.mode)


@dataclass(frozen=True)
class GradualConfig:
    """``gradual``: Gradually Cascading Sum Augmentation from ``k0`` groups to clean batches."""

    k0: int = 4
    fine_tune_frac: float = 0.2
    mode: MixMode = "group"

    def __post_init__(self) -> None:
        _positive_int("gradual", "k0", self.k0, low=2)
        _finite("gradual", "fine_tune_frac", self.fine_tune_frac, 0.0, 1.0)
        if self.fine_tune_frac >= 1.0:
            raise ValueError(f"gradual.fine_tune_frac must be < 1, got {self.fine_tune_frac}")
        _mode("gradual", self.mode)


@dataclass(frozen=True)
class PatchUpConfig:
    """``patchup-soft`` / ``patchup-hard``: hidden-layer block mixing."""

    layers: tuple[str, ...] = ("conv1", "layer1")
    loss: Literal["bce", "ce"] = "bce"

    def __post_init__(self) -> None:
        _names("patchup", "layers", self.layers)
        if self.loss not in ("bce", "ce"):
            raise ValueError(f"patchup.loss must be 'bce' or 'ce', got {self.loss!r}")


@dataclass(frozen=True)
class LossDeltaConfig:
    """``loss-delta`` / ``loss-delta-external``: batches scored by the loss drop of a trial step."""

    k: int = 4
    relative: bool = False
    external_rows: int = 512

    def __post_init__(self) -> None:
        _positive_int("loss_delta", "k", self.k)
        _positive_int("loss_delta", "external_rows", self.external_rows)


@dataclass(frozen=True)
class LossOrderConfig:
    """``loss-order``: per-sample loss ordering of a pool of batches."""

    order: Literal["ascending", "descending"] = "descending"

    def __post_init__(self) -> None:
        if self.order not in ("ascending", "descending"):
            raise ValueError(f"loss_order.order must be 'ascending' or 'descending', got {self.order!r}")


@dataclass(frozen=True)
class ReplicationConfig:
    """``replicate`` (and what ``invariance``/``saliency`` build on): ``m`` augmented copies per seed."""

    replicas: int = 4

    def __post_init__(self) -> None:
        _positive_int("replication", "replicas", self.replicas, low=2)


@dataclass(frozen=True)
class InvarianceConfig:
    """``invariance``: ``(1 - alpha) * task + sum_l alpha_l * L_inv^l`` over ``layers``."""

    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    alpha: float = 0.1
    ratio: float = 10.0

    def __post_init__(self) -> None:
        _names("invariance", "layers", self.layers)
        _finite("invariance", "alpha", self.alpha, 0.0, 1.0)
        _finite("invariance", "ratio", self.ratio, 0.0)
        if self.ratio <= 0:
            raise ValueError(f"invariance.ratio must be > 0, got {self.ratio}")


@dataclass(frozen=True)
class SaliencyConfig:
    """``saliency``: ``+ weight * L_sal``, the saliency-map consistency term."""

    weight: float = 1.0

    def __post_init__(self) -> None:
        _finite("saliency", "weight", self.weight, 0.0)


@dataclass(frozen=True)
class CutMixConfig:
    """``cutmix``: a partner's box pasted into each row, targets mixed by area (Yun et al. 2019)."""

    alpha: float = 1.0
    prob: float = 1.0

    def __post_init__(self) -> None:
        _finite("cutmix", "alpha", self.alpha, 0.0)
        if self.alpha <= 0:
            raise ValueError(f"cutmix.alpha must be > 0, got {self.alpha}")
        _finite("cutmix", "prob", self.prob, 0.0, 1.0)


@dataclass(frozen=True)
class CutOutConfig:
    """``cutout``: a square hole of side ``length`` in each row (DeVries & Taylor 2017)."""

    length: int = 16
    prob: float = 1.0

    def __post_init__(self) -> None:
        _positive_int("cutout", "length", self.length)
        _finite("cutout", "prob", self.prob, 0.0, 1.0)


@dataclass(frozen=True)
class MixUpConfig:
    """``mixup``: pairs blended with ``lam ~ Beta(alpha, alpha)`` (Zhang et al. 2018)."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        _finite("mixup", "alpha", self.alpha, 0.0)
        if self.alpha <= 0:
            raise ValueError(f"mixup.alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class SignConfig:
    """``sign``: the training set plus its SIGN transforms for every ``K`` in ``iters``."""

    iters: tuple[int, ...] = (50, 100)
    eta: float = 1.0
    layer: str | None = None
    teacher: str | None = None

    def __post_init__(self) -> None:
        if not self.iters or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.iters):
            raise ValueError(f"sign.iters must be integers >= 1, got {self.iters!r}")
        _finite("sign", "eta", self.eta)
        if self.eta <= 0:
            raise ValueError(f"sign.eta must be > 0, got {self.eta}")


#: ImageNet's evaluation transform: resize the shorter side to 256, centre-crop 224.
IMAGENET_RESIZE_RATIO = 256 / 224
#: Bounds of ``val_resize / image_size``. Below 1 the centre crop would be larger than the resized image;
#: above 1.5 it keeps less than (1 / 1.5)^2 = 44 % of the resized image's central square, so validation sees a
#: different, zoomed-in task than training's crops: at ``--image-size 96`` with a resize of 256 (ratio 2.67,
#: the old fixed default) the crop kept 14 % and accuracy fell to near chance. The usual settings lie well
#: inside: 1 (whole image) to 1.33 (crop fraction 0.75); ImageNet's is 1.14.
VAL_RESIZE_RATIO = (1.0, 1.5)


def default_val_resize(image_size: int) -> int:
    """The validation resize that follows the training size with ImageNet's ratio: ``round(image_size * 256 / 224)``
    (256 at 224, 73 at 64)."""
    return round(image_size * IMAGENET_RESIZE_RATIO)


def check_val_resize(image_size: int, val_resize: int) -> None:
    """Refuse a ``val_resize / image_size`` ratio outside :data:`VAL_RESIZE_RATIO`.

    Refused, not warned about: the result of such a run is a validation accuracy that measures the wrong
    crop, and a warning scrolls away in a long run's log while the number it spoils ends up in a table.

    Raises:
        ValueError: both values, the ratio and the bounds are named.
    """
    low, high = VAL_RESIZE_RATIO
    ratio = val_resize / image_size
    if ratio < low:
        raise ValueError(f"train.val_resize={val_resize} must be >= train.image_size={image_size} "
                         "(validation resizes the shorter side, then crops image_size)")
    if ratio > high:
        raise ValueError(f"train.val_resize={val_resize} is {ratio:.2f} x train.image_size={image_size}: the "
                         f"validation centre crop would keep {100 / ratio ** 2:.0f} % of the resized image's "
                         f"central square; use a ratio in [{low:g}, {high:g}] (leave --val-resize unset for "
                         f"{default_val_resize(image_size)}, ImageNet's 256/224)")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one training run.

    The run's own settings come first; each algorithm reads only its own dataclass (``cfg.gradual`` for
    ``gradual``...), whichever recipe is chosen, so a combined recipe such as ``gradual+invariance``
    needs no settings of its own.

    ``val_resize`` (streamed data: the shorter side validation images are resized to before the centre crop of
    ``image_size``) left ``None`` becomes :func:`default_val_resize` ``(image_size)`` at construction, so after
    it the field always holds the number the run uses (and ``metrics.json`` records it). A given value is
    checked by :func:`check_val_resize`. ``dataclasses.replace`` of ``image_size`` alone keeps the resolved
    number: pass ``val_resize=None`` with it to resolve it again.
    """

    recipe: str = "gradual"
    epochs: int = 15
    seed: int = 0
    samples_per_class: int | None = 100
    model: str = "preact-small"
    device: str = "auto"
    out: str | None = None
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    shape: Literal["cifar", "native"] = "cifar"
    batch_size: int = 64
    eval_batch_size: int | None = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    loss: Literal["ce", "bce"] = "ce"
    val_per_class: int = 50
    checkpoint_out: str | None = None
    bn_recalibration: bool = True
    bn_batches: int = 16
    tta_draws: int = 0
    channels_last: bool = False
    progress: bool = True
    loader: str = "torch"
    image_size: int = 224
    val_resize: int | None = None
    workers: int | None = None
    amp: Literal["off", "bf16", "fp16"] = "off"
    resume: bool = False
    checkpoint_every: int | None = None
    cache_dir: str | None = None
    schedule: Literal["cosine", "plateau"] = "cosine"
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    eval_every: int = 1
    eval_subset: int | None = None
    sum: SumConfig = field(default_factory=SumConfig)
    cascade: CascadeConfig = field(default_factory=CascadeConfig)
    gradual: GradualConfig = field(default_factory=GradualConfig)
    patchup: PatchUpConfig = field(default_factory=PatchUpConfig)
    loss_delta: LossDeltaConfig = field(default_factory=LossDeltaConfig)
    loss_order: LossOrderConfig = field(default_factory=LossOrderConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    invariance: InvarianceConfig = field(default_factory=InvarianceConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    sign: SignConfig = field(default_factory=SignConfig)
    cutmix: CutMixConfig = field(default_factory=CutMixConfig)
    cutout: CutOutConfig = field(default_factory=CutOutConfig)
    mixup: MixUpConfig = field(default_factory=MixUpConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_per_class", "bn_batches", "image_size"):
            _positive_int("train", name, getattr(self, name))
        if self.val_resize is None:  # resolved here, once: every reader sees the number the run uses
            object.__setattr__(self, "val_resize", default_val_resize(self.image_size))
        _positive_int("train", "val_resize", self.val_resize)
        for name in ("eval_batch_size", "checkpoint_every", "eval_subset"):
            if getattr(self, name) is not None:
                _positive_int("train", name, getattr(self, name))
        if self.workers is not None:
            _positive_int("train", "workers", self.workers, low=0)
        check_val_resize(self.image_size, self.val_resize)
        if self.amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"train.amp must be 'off', 'bf16' or 'fp16', got {self.amp!r}")
        if self.resume and self.out is None:
            raise ValueError("train.resume needs train.out: the folder whose state.pt the run resumes from")
        if self.dataset.startswith(("imagefolder:", "beton:")) and self.samples_per_class is not None:
            raise ValueError(f"train.samples_per_class={self.samples_per_class} is a small-data option, off for "
                             f"{self.dataset.partition(':')[0]} data: leave it unset (None) to train on every image")
        _positive_int("train", "tta_draws", self.tta_draws, low=0)
        if self.samples_per_class is not None:
            _positive_int("train", "samples_per_class", self.samples_per_class)
        for name in ("lr", "momentum", "weight_decay"):
            _finite("train", name, getattr(self, name), 0.0)
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "plateau"):
            raise ValueError(f"train.schedule must be 'cosine' or 'plateau', got {self.schedule!r}")
        check_plateau(self.plateau_factor, self.plateau_patience)
        _positive_int("train", "eval_every", self.eval_every)
        if self.loss not in ("ce", "bce"):
            raise ValueError(f"train.loss must be 'ce' or 'bce', got {self.loss!r}")
        if self.loader not in ("torch", "dali", "ffcv"):
            raise ValueError(f"train.loader must be 'torch', 'dali' or 'ffcv', got {self.loader!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"train.seed must be an integer in [0, 2**63), got {self.seed!r}")

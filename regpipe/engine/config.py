"""The settings of one training run: the run's own, then one small dataclass per algorithm.

These dataclasses are the single definition of every setting: ``regpipe train`` and ``regpipe compare``
build their options from them (each field a flag, its help the field's entry in the class's ``Attributes:``
section, older flag names kept as aliases through ``tyro.conf.arg``), and YAML config files hold them
field by field (:func:`config_to_dict`, :func:`config_from_dict`). Each dataclass checks its own values when
it is built, so a bad value is named before any data is read; checks that relate several settings are in
:func:`regpipe.engine.config_checks.check_config`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar, get_args, get_type_hints

import dacite
import tyro
import yaml

from regpipe.core.files import atomic_write
from regpipe.engine.schedule import check_plateau

__all__ = [
    "AUGMENT_WORDS",
    "CascadeConfig",
    "CutMixConfig",
    "CutOutConfig",
    "GradualConfig",
    "InvarianceConfig",
    "LossDeltaConfig",
    "LossOrderConfig",
    "MixUpConfig",
    "PatchUpConfig",
    "RESOLVED_FIELDS",
    "ReplicationConfig",
    "SaliencyConfig",
    "SignConfig",
    "SumConfig",
    "TrainConfig",
    "augment_words",
    "check_val_resize",
    "config_from_dict",
    "config_to_dict",
    "config_yaml",
    "default_val_resize",
    "load_yaml",
    "read_config",
    "write_config",
]

MixMode = Literal["group", "permute"]
#: The choices of TrainConfig's fields of the same names (``__post_init__`` checks values against them).
Shape = Literal["cifar", "native"]
TaskLoss = Literal["ce", "bce"]
LoaderName = Literal["torch", "dali", "ffcv"]
Amp = Literal["off", "bf16", "fp16"]
Schedule = Literal["cosine", "plateau"]
#: The per-epoch loggers besides ``metrics.json`` (always written): ``json`` adds none.
LoggerName = Literal["json", "tensorboard", "wandb"]
#: The small-data default of in-memory datasets (``samples_per_class="auto"``).
SMALL_DATA_PER_CLASS = 100
#: ``dataset`` prefixes of data streamed from disk by reference (everything else is read into memory).
STREAMED_PREFIXES = ("imagefolder:", "beton:")
#: The words of ``augment`` (the base augmentation), in the order they are applied and recorded.
AUGMENT_WORDS = ("crop", "flip")
#: The fields :class:`TrainConfig` resolves at construction from other fields (``_resolve``), and the value
#: that asks for the resolution.
RESOLVED_FIELDS = MappingProxyType({"val_resize": None, "samples_per_class": "auto", "augment": "auto"})


def _also(*names: str) -> Any:
    """A field's other flag names (the CLI's names before the flags were generated from these dataclasses)."""
    return tyro.conf.arg(aliases=names)


def _positive_int(owner: str, name: str, value: object, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


def _finite(owner: str, name: str, value: object, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{owner}.{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{owner}.{name} must be in [{low}, {high}], got {value!r}")


def _names(owner: str, name: str, value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{owner}.{name} must name at least one module, got {value!r}")


def _ints(owner: str, name: str, value: tuple[int, ...]) -> None:
    if not value or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in value):
        raise ValueError(f"{owner}.{name} must be integers >= 1, got {value!r}")


def augment_words(value: str) -> tuple[str, ...]:
    """The words of an ``augment`` setting: ``"none"`` -> ``()``, ``"flip,crop"`` -> ``("crop", "flip")`` (the
    order of :data:`AUGMENT_WORDS`; ``"auto"`` must be resolved first).

    Raises:
        ValueError: not a string, an unknown or repeated word (named, with the allowed words).
    """
    allowed = f"auto, none, or a comma list of {', '.join(AUGMENT_WORDS)} (e.g. crop,flip)"
    if not isinstance(value, str):
        raise ValueError(f"train.augment must be {allowed}, got {value!r}")
    if value == "none":
        return ()
    words = [w.strip() for w in value.split(",")]
    unknown = [w for w in words if w not in AUGMENT_WORDS]
    if unknown or len(set(words)) != len(words):
        bad = f"unknown word(s) {unknown}" if unknown else "a word given twice"
        raise ValueError(f"train.augment={value!r}: {bad}; it must be {allowed}")
    return tuple(w for w in AUGMENT_WORDS if w in words)


def _choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        listed = " or ".join([", ".join(map(repr, choices[:-1])), repr(choices[-1])])
        raise ValueError(f"{owner}.{name} must be {listed}, got {value!r}")


@dataclass(frozen=True)
class SumConfig:
    """``sum``: Sum Augmentation with a fixed number of groups ``k``.

    Attributes:
        k: sum groups of the 'sum' recipe: each mixed row is the sum of k inputs.
        mode: group: N rows -> N/k mixed rows (the thesis's); permute: keep N rows, each summed with k-1
            permuted partners.
    """

    k: Annotated[int, _also("--k")] = 4
    mode: MixMode = "group"

    def __post_init__(self) -> None:
        _positive_int("sum", "k", self.k)
        _choice("sum", "mode", self.mode, get_args(MixMode))


@dataclass(frozen=True)
class CascadeConfig:
    """``cascade``: stages of decreasing ``k``, each until the validation accuracy stops improving.

    Attributes:
        stages: cascade stages, strictly decreasing k (comma- or space-separated).
        patience: cascade: evaluations without improvement before the next stage.
        stop_at: cascade: the last k (2 skips the clean fine-tune, for test-time sum augmentation).
        mode: as sum.mode, for the cascade's stages.
    """

    stages: Annotated[tuple[int, ...], _also("--stages")] = (4, 2, 1)
    patience: Annotated[int, _also("--patience")] = 3
    stop_at: Annotated[int, _also("--stop-at")] = 1
    mode: MixMode = "group"

    def __post_init__(self) -> None:
        if not self.stages or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.stages) \
                or any(a <= b for a, b in zip(self.stages, self.stages[1:])):
            raise ValueError(f"cascade.stages must be strictly decreasing integers >= 1, got {self.stages!r}")
        _positive_int("cascade", "patience", self.patience)
        _positive_int("cascade", "stop_at", self.stop_at)
        _choice("cascade", "mode", self.mode, get_args(MixMode))


@dataclass(frozen=True)
class GradualConfig:
    """``gradual``: Gradually Cascading Sum Augmentation from ``k0`` groups to clean batches.

    Attributes:
        k0: starting inputs per mixed row of the 'gradual' recipe (>= 2).
        fine_tune_frac: share of the epochs trained clean after the gradual phase, in [0, 1).
        mode: as sum.mode, for the gradual schedule.
    """

    k0: Annotated[int, _also("--k0")] = 4
    fine_tune_frac: Annotated[float, _also("--fine-tune-frac")] = 0.2
    mode: MixMode = "group"

    def __post_init__(self) -> None:
        _positive_int("gradual", "k0", self.k0, low=2)
        _finite("gradual", "fine_tune_frac", self.fine_tune_frac, 0.0, 1.0)
        if self.fine_tune_frac >= 1.0:
            raise ValueError(f"gradual.fine_tune_frac must be < 1, got {self.fine_tune_frac}")
        _choice("gradual", "mode", self.mode, get_args(MixMode))


@dataclass(frozen=True)
class PatchUpConfig:
    """``patchup-soft`` / ``patchup-hard``: hidden-layer block mixing.

    Attributes:
        layers: module names of PatchUp layers 1, 2, ... (layer 0 is the input space); the default mixes
            after the stem conv and after the first residual stage.
        loss: bce: the official BCE on softmax; ce: cross-entropy with the same weighting.
    """

    layers: Annotated[tuple[str, ...], _also("--patchup-layers")] = ("conv1", "layer1")
    loss: Annotated[Literal["bce", "ce"], _also("--patchup-loss")] = "bce"

    def __post_init__(self) -> None:
        _names("patchup", "layers", self.layers)
        _choice("patchup", "loss", self.loss, ("bce", "ce"))


@dataclass(frozen=True)
class LossDeltaConfig:
    """``loss-delta`` / ``loss-delta-external``: batches scored by the loss drop of a trial step.

    Attributes:
        k: loss-delta: candidate batches scored per step.
        relative: loss-delta: score the relative loss drop instead of the absolute one.
        external_rows: loss-delta-external: held-out validation rows the trial step's loss is measured on.
    """

    k: Annotated[int, _also("--delta-k")] = 4
    relative: Annotated[bool, _also("--delta-relative")] = False
    external_rows: Annotated[int, _also("--delta-external-rows")] = 512

    def __post_init__(self) -> None:
        _positive_int("loss_delta", "k", self.k)
        _positive_int("loss_delta", "external_rows", self.external_rows)


@dataclass(frozen=True)
class LossOrderConfig:
    """``loss-order``: per-sample loss ordering of a pool of batches.

    Attributes:
        order: loss-order: hand out low- (ascending) or high-loss (descending) samples first.
    """

    order: Annotated[Literal["ascending", "descending"], _also("--order")] = "descending"

    def __post_init__(self) -> None:
        _choice("loss_order", "order", self.order, ("ascending", "descending"))


@dataclass(frozen=True)
class ReplicationConfig:
    """``replicate`` (and what ``invariance``/``saliency`` build on): ``m`` augmented copies per seed.

    Attributes:
        replicas: copies per seed (m) of the replicate/invariance/saliency recipes (>= 2); batches hold
            batch-size/m seeds, so a step sees batch-size rows.
    """

    replicas: Annotated[int, _also("--replicas")] = 4

    def __post_init__(self) -> None:
        _positive_int("replication", "replicas", self.replicas, low=2)


@dataclass(frozen=True)
class InvarianceConfig:
    """``invariance``: ``(1 - alpha) * task + sum_l alpha_l * L_inv^l`` over ``layers``.

    Attributes:
        layers: module names of the invariance loss, shallow to deep.
        alpha: invariance share alpha of (1 - alpha) * task + sum_l alpha_l * L_inv^l, in [0, 1].
        ratio: alpha_last / alpha_first across the invariance layers (> 0).
    """

    layers: Annotated[tuple[str, ...], _also("--inv-layers")] = ("layer1", "layer2", "layer3")
    alpha: Annotated[float, _also("--inv-alpha")] = 0.1
    ratio: Annotated[float, _also("--inv-ratio")] = 10.0

    def __post_init__(self) -> None:
        _names("invariance", "layers", self.layers)
        _finite("invariance", "alpha", self.alpha, 0.0, 1.0)
        _finite("invariance", "ratio", self.ratio, 0.0)
        if self.ratio <= 0:
            raise ValueError(f"invariance.ratio must be > 0, got {self.ratio}")


@dataclass(frozen=True)
class SaliencyConfig:
    """``saliency``: ``+ weight * L_sal``, the saliency-map consistency term.

    Attributes:
        weight: weight of the saliency consistency term (>= 0).
    """

    weight: Annotated[float, _also("--sal-weight")] = 1.0

    def __post_init__(self) -> None:
        _finite("saliency", "weight", self.weight, 0.0)


@dataclass(frozen=True)
class CutMixConfig:
    """``cutmix``: a partner's box pasted into each row, targets mixed by area (Yun et al. 2019).

    Attributes:
        alpha: cutmix: lam ~ Beta(alpha, alpha) sets the pasted box's area (> 0).
        prob: cutmix: chance a batch is mixed, in [0, 1] (the authors' CIFAR runs: 0.5).
    """

    alpha: Annotated[float, _also("--cutmix-alpha")] = 1.0
    prob: Annotated[float, _also("--cutmix-prob")] = 1.0

    def __post_init__(self) -> None:
        _finite("cutmix", "alpha", self.alpha, 0.0)
        if self.alpha <= 0:
            raise ValueError(f"cutmix.alpha must be > 0, got {self.alpha}")
        _finite("cutmix", "prob", self.prob, 0.0, 1.0)


@dataclass(frozen=True)
class CutOutConfig:
    """``cutout``: a square hole of side ``length`` in each row (DeVries & Taylor 2017).

    Attributes:
        length: cutout: side of the square hole in pixels (16 is CIFAR-10's).
        prob: cutout: chance a row gets a hole, in [0, 1].
    """

    length: Annotated[int, _also("--cutout-length")] = 16
    prob: Annotated[float, _also("--cutout-prob")] = 1.0

    def __post_init__(self) -> None:
        _positive_int("cutout", "length", self.length)
        _finite("cutout", "prob", self.prob, 0.0, 1.0)


@dataclass(frozen=True)
class MixUpConfig:
    """``mixup``: pairs blended with ``lam ~ Beta(alpha, alpha)`` (Zhang et al. 2018).

    Attributes:
        alpha: mixup: lam ~ Beta(alpha, alpha) (> 0).
    """

    alpha: Annotated[float, _also("--mixup-alpha")] = 1.0

    def __post_init__(self) -> None:
        _finite("mixup", "alpha", self.alpha, 0.0)
        if self.alpha <= 0:
            raise ValueError(f"mixup.alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class SignConfig:
    """``sign``: the training set plus its SIGN transforms for every ``K`` in ``iters``.

    Attributes:
        iters: SIGN iteration counts K added to the training set.
        eta: SIGN step size (> 0).
        layer: module whose output SIGN differentiates (None: the model's features(), the pooled vector
            before the classifier).
        teacher: checkpoint of the teacher (None: train the baseline first with the same settings).
    """

    iters: Annotated[tuple[int, ...], _also("--sign-iters")] = (50, 100)
    eta: Annotated[float, _also("--sign-eta")] = 1.0
    layer: Annotated[str | None, _also("--sign-layer")] = None
    teacher: Annotated[str | None, _also("--sign-teacher")] = None

    def __post_init__(self) -> None:
        _ints("sign", "iters", self.iters)
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

    Three fields are resolved at construction, so that afterwards they hold the value the run uses (and
    ``metrics.json`` and ``OUT/config.yaml`` record it): ``val_resize`` left ``None`` becomes
    :func:`default_val_resize` ``(image_size)``, ``samples_per_class="auto"`` becomes 100 for in-memory
    datasets and ``None`` (every image) for data streamed from disk (``imagefolder:``, ``beton:``);
    ``samples_per_class=0`` means every image too (``None``); ``augment="auto"`` becomes ``"none"`` in memory
    and ``"crop,flip"`` for streamed data, and any other value its words in :data:`AUGMENT_WORDS` order.
    ``dataclasses.replace`` of ``image_size`` or ``dataset`` alone keeps the resolved values: pass
    ``val_resize=None`` / ``samples_per_class="auto"`` / ``augment="auto"`` with it to resolve them again.
    Checks that relate several settings are in :func:`~regpipe.engine.config_checks.check_config`, which
    :func:`~regpipe.engine.train.train` runs first.

    Attributes:
        recipe: '+'-joined algorithm words, e.g. gradual+invariance (the words, RECIPE_WORDS of
            regpipe.engine.algorithms, are listed in the command's description).
        epochs: epoch budget.
        seed: seed of the data subset, the initialisation, the batch order and the ops' draws, in [0, 2**63).
        samples_per_class: in-memory data: a stratified, seeded training subset of this many images per
            class; 0 or None: every image; auto: 100 in memory, every image for imagefolder:/beton: data,
            where it must stay auto or None.
        model: preact-small, preact-resnet18, torchvision:NAME (e.g. torchvision:resnet50), timm:NAME (e.g.
            timm:resnet50), or package.module:factory (called with num_classes= and in_channels= when it
            takes it).
        device: auto (CUDA if present), cpu, cuda, cuda:1, ...
        out: output folder: metrics.json, config.yaml, state.pt while running, the loggers' files.
        dataset: streamed from disk: imagefolder:ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*, the ImageNet
            layout) | beton:TRAIN.beton,VAL.beton (FFCV, with --loader ffcv); in memory: fashion-mnist |
            npz:DIR (train.npz, test.npz) | npz:TRAIN.npz,TEST.npz | folder:ROOT (ROOT/train, ROOT/test: a
            sub-folder per class).
        data_dir: folder with the Fashion-MNIST idx .gz files (None: the folder named by the environment
            variable REGPIPE_DATA_DIR, else the one of Debian's dataset-fashion-mnist package).
        shape: cifar: 3x32x32 (pad + repeat channel); native: as stored (1x28x28).
        batch_size: global batch: summed over the torchrun processes, each loads batch-size/N.
        eval_batch_size: evaluation batch per process (None: batch-size/N).
        lr: SGD-Nesterov learning rate, see schedule.
        momentum: SGD-Nesterov momentum.
        weight_decay: SGD weight decay.
        loss: ce: soft-target cross-entropy; bce: the Sum Augmentation paper's multi-hot BCE.
        val_per_class: held-out validation samples per class, for the cascade's and the plateau schedule's
            decisions.
        checkpoint_out: also save the trained model here (a checkpoint `regpipe sign` and `regpipe eval` read).
        bn_recalibration: evaluate mixed phases with BatchNorm statistics re-estimated on clean batches;
            with --no-bn-recalibration, as trained.
        bn_batches: clean batches the BatchNorm statistics are re-estimated on.
        tta_draws: also report test accuracy with test-time sum augmentation (k=2) over this many draws (0: off).
        channels_last: channels_last inputs and model.
        progress: show a progress bar.
        logger: per-epoch logger besides metrics.json (always written): json adds none; tensorboard writes
            event files under out (torch.utils.tensorboard, the tensorboard extra); wandb logs to Weights &
            Biases (the wandb extra; WANDB_MODE=offline keeps it on disk).
        loader: training data loader: torch DataLoader, NVIDIA DALI or FFCV (the dali/ffcv extras); all read
            the same batches and run the recipe's ops on the device.
        image_size: streamed data: side of the training random-resized crop and of the validation centre crop.
        val_resize: streamed data: validation images' shorter side is resized to this before the centre crop
            of image-size; 1 to 1.5 times image-size (None: round(image-size * 256 / 224), ImageNet's
            ratio, which gives 256 at 224 and 73 at 64).
        workers: decoding workers per process (torch DataLoader workers, DALI threads, FFCV workers); None: 0
            in memory, else the cores per process up to 8.
        amp: mixed precision: autocast forward and loss in bfloat16, or float16 with loss scaling.
        resume: continue the interrupted run in out from its OUT/state.pt (same settings): on the same
            machine and thread count it trains the per-epoch losses and ends with the metrics of the
            uninterrupted run, on every loader.
        checkpoint_every: also write OUT/state.pt every N optimizer steps (it is always written at epoch ends
            and on SIGTERM, and removed when the run finishes; loss-order, and loss-delta with an op, resume
            at epoch starts only, which the run says when it starts).
        cache_dir: where --data imagefolder:... converted for --loader ffcv is kept between runs (None:
            the regpipe folder of XDG_CACHE_HOME, else of ~/.cache).
        schedule: learning-rate schedule: cosine decay to 0 over the epochs, or plateau: multiply the lr by
            plateau-factor when the validation accuracy has not improved for plateau-patience evaluations,
            after Simionescu 2020: reduce when learning stagnates.
        plateau_factor: plateau: lr multiplier at each reduction, in (0, 1).
        plateau_patience: plateau: evaluations without improvement before a reduction.
        eval_every: evaluate every N epochs (epochs N, 2N, ... and always the last); the plateau schedule and
            the cascade count these evaluations.
        eval_subset: the per-epoch test accuracy reads only the first N test images (a seeded draw of
            in-memory data); the final test accuracy always reads the whole test set (None: all).
        augment: the base augmentation of every recipe's training inputs, applied before the recipe's own
            ops (replicate's copies are made from the augmented rows): crop,flip is the CIFAR protocol (a
            random crop of the image padded by augment-pad black pixels, and a horizontal flip, each drawn per
            row), crop or flip alone, none, or auto: none for in-memory data (fashion-mnist, npz:, folder:),
            crop,flip for imagefolder:/beton: data, where the base is the loader's random-resized crop and
            horizontal flip (the ImageNet protocol; it must stay auto or crop,flip there, as the loaders always
            crop and flip).
        augment_pad: the black padding (pixels per side) of the base crop: 4 for 32-pixel images (CIFAR); less
            than the image's height and width.
        sum: the sum recipe's settings.
        cascade: the cascade recipe's settings.
        gradual: the gradual recipe's settings.
        patchup: the patchup-soft/patchup-hard recipes' settings.
        loss_delta: the loss-delta/loss-delta-external recipes' settings.
        loss_order: the loss-order recipe's settings.
        replication: the replicate/invariance/saliency recipes' replication.
        invariance: the invariance recipe's settings.
        saliency: the saliency recipe's settings.
        sign: the sign recipe's settings.
        cutmix: the cutmix recipe's settings.
        cutout: the cutout recipe's settings.
        mixup: the mixup recipe's settings.
    """

    recipe: str = "gradual"
    epochs: int = 15
    seed: int = 0
    samples_per_class: int | Literal["auto"] | None = "auto"
    model: str = "preact-small"
    device: str = "auto"
    out: str | None = None
    dataset: Annotated[str, _also("--data")] = "fashion-mnist"
    data_dir: str | None = None
    shape: Shape = "cifar"
    batch_size: int = 64
    eval_batch_size: int | None = None
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    loss: TaskLoss = "ce"
    val_per_class: int = 50
    checkpoint_out: str | None = None
    bn_recalibration: bool = True
    bn_batches: int = 16
    tta_draws: int = 0
    channels_last: bool = False
    progress: bool = True
    logger: LoggerName = "json"
    loader: LoaderName = "torch"
    image_size: int = 224
    val_resize: int | None = None
    workers: int | None = None
    amp: Amp = "off"
    resume: bool = False
    checkpoint_every: int | None = None
    cache_dir: str | None = None
    schedule: Schedule = "cosine"
    plateau_factor: float = 0.1
    plateau_patience: int = 3
    eval_every: int = 1
    eval_subset: int | None = None
    augment: str = "auto"
    augment_pad: int = 4
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
        self._resolve()
        for name in ("epochs", "batch_size", "val_per_class", "bn_batches", "image_size", "val_resize",
                     "eval_every"):
            _positive_int("train", name, getattr(self, name))
        for name in ("eval_batch_size", "checkpoint_every", "eval_subset", "samples_per_class"):
            if getattr(self, name) is not None:
                _positive_int("train", name, getattr(self, name))
        _positive_int("train", "tta_draws", self.tta_draws, low=0)
        _positive_int("train", "augment_pad", self.augment_pad, low=0)
        if self.workers is not None:
            _positive_int("train", "workers", self.workers, low=0)
        for name in ("lr", "momentum", "weight_decay"):
            _finite("train", name, getattr(self, name), 0.0)
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        check_plateau(self.plateau_factor, self.plateau_patience)
        for name, kind in (("amp", Amp), ("schedule", Schedule), ("loss", TaskLoss), ("loader", LoaderName),
                           ("shape", Shape), ("logger", LoggerName)):
            _choice("train", name, getattr(self, name), get_args(kind))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"train.seed must be an integer in [0, 2**63), got {self.seed!r}")

    def _resolve(self) -> None:
        """Replace ``val_resize=None``, ``samples_per_class="auto"`` (or 0) and ``augment="auto"`` by what the run
        uses (once, here: every reader sees the same value)."""
        streamed = isinstance(self.dataset, str) and self.dataset.startswith(STREAMED_PREFIXES)
        if self.val_resize is None and isinstance(self.image_size, int):
            object.__setattr__(self, "val_resize", default_val_resize(self.image_size))
        if self.augment == "auto":
            # In memory, none keeps the meaning of earlier runs; streamed data is always cropped and flipped.
            object.__setattr__(self, "augment", ",".join(AUGMENT_WORDS) if streamed else "none")
        elif self.augment != "none":  # one spelling, so flip,crop and crop,flip record (and compare) as one setting
            object.__setattr__(self, "augment", ",".join(augment_words(self.augment)))
        if self.samples_per_class == "auto":
            object.__setattr__(self, "samples_per_class", None if streamed else SMALL_DATA_PER_CLASS)
        elif self.samples_per_class == 0 and not isinstance(self.samples_per_class, bool):
            object.__setattr__(self, "samples_per_class", None)


Config = TypeVar("Config")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON values, field by field (nested dataclasses as mappings, tuples
    as lists): what ``OUT/config.yaml`` and ``--print-config`` hold, and what :func:`config_from_dict` reads."""
    return json.loads(json.dumps(asdict(cfg)))


def _unknown_key(cls: type, data: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first key of ``data`` (dotted from the top) that is not a field of ``cls`` or of its nested
    dataclasses, or ``None``."""
    known = get_type_hints(cls)  # the fields' types, the postponed annotations resolved
    for key, value in data.items():
        if key not in known:
            return f"{prefix}{key}"
        if is_dataclass(known[key]) and isinstance(value, Mapping):
            found = _unknown_key(known[key], value, f"{prefix}{key}.")
            if found is not None:
                return found
    return None


def _type_name(kind: Any) -> str:
    """``Literal['a', 'b']`` -> ``one of 'a', 'b'``; ``tuple[int, ...]`` -> ``a list of int``; ``int | None`` ->
    ``int or None``."""
    origin, args = getattr(kind, "__origin__", None), getattr(kind, "__args__", ())
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        return f"a list of {_type_name(args[0])}"
    if args and origin is not None and not isinstance(origin, type):  # a Union
        return " or ".join(_type_name(a) for a in args)
    if is_dataclass(kind):
        return f"a mapping of {kind.__name__}'s settings"
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def config_from_dict(data: Any, source: str, cls: type[Config] = TrainConfig) -> Config:  # type: ignore[assignment]
    """Build ``cls`` (a config dataclass) from a mapping such as a YAML file's: the keys are the field names,
    a nested dataclass's fields in a nested mapping; a missing key keeps its default.

    Lists become tuples and integers are accepted for floats; nothing else is converted.

    Args:
        data: the mapping (``yaml.safe_load`` of a config file).
        source: what the mapping came from (a file name), for the errors.

    Raises:
        ValueError: one line naming ``source``, the offending key (dotted: ``sum.k``) and the value: a key that
            is no setting, a value of the wrong type, or a value the dataclass refuses.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping of settings (key: value lines), got {type(data).__name__}")
    unknown = _unknown_key(cls, data)
    if unknown is not None:
        raise ValueError(f"{source}: unknown key {unknown!r}: not a setting of regpipe (see --print-config for "
                         "every key)")
    hooks = {float: lambda v: float(v) if isinstance(v, int) and not isinstance(v, bool) else v}
    try:
        return dacite.from_dict(cls, dict(data), config=dacite.Config(strict=True, cast=[tuple], type_hooks=hooks))
    except dacite.WrongTypeError as err:
        raise ValueError(f"{source}: {err.field_path} must be {_type_name(err.field_type)}, got "
                         f"{err.value!r}") from err
    except dacite.DaciteError as err:
        raise ValueError(f"{source}: {err}") from err
    except ValueError as err:  # a value the dataclass refuses (its __post_init__ names the field)
        raise ValueError(f"{source}: {err}") from err


def load_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of a file, its errors naming the file.

    Raises:
        FileNotFoundError: no such file (named). ValueError: not valid YAML (the file and the position).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise ValueError(f"{path}: not valid YAML{line}: {getattr(err, 'problem', None) or err}") from err


def read_config(path: str | Path) -> TrainConfig:
    """The :class:`TrainConfig` of a YAML file (``OUT/config.yaml`` of a run, or ``--print-config``'s output).

    Raises:
        FileNotFoundError, ValueError: as :func:`load_yaml` and :func:`config_from_dict`.
    """
    return config_from_dict(load_yaml(path), str(path))


class _Dumper(yaml.SafeDumper):
    """Block mappings, lists on one line (``stages: [4, 2, 1]``)."""


_Dumper.add_representer(list, lambda dumper, value: dumper.represent_sequence("tag:yaml.org,2002:seq", value,
                                                                               flow_style=True))


def config_yaml(*configs: Any) -> str:
    """Config dataclasses as one YAML mapping (their fields in order, lists on one line), as
    :func:`config_from_dict` reads it back."""
    data: dict[str, Any] = {}
    for cfg in configs:
        data.update(config_to_dict(cfg))
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def write_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML (:func:`config_yaml`), atomically (a temporary file in the same folder, then
    ``os.replace``)."""
    text = config_yaml(cfg)
    return atomic_write(path, lambda tmp: tmp.write_text(text))

"""Pure functions: tensors in, tensors out, every random choice passed in.

Each function's docstring states the formula it implements and the paper it comes from: Sum
Augmentation and its schedules (:mod:`~regpipe.functional.sum_mix`, :mod:`~regpipe.functional.tta`),
PatchUp (:mod:`~regpipe.functional.patchup`), the invariance loss (:mod:`~regpipe.functional.invariance`),
saliency-map consistency (:mod:`~regpipe.functional.saliency`) and SIGN (:mod:`~regpipe.functional.sign`).
"""

from regpipe.functional.augment import (
    affine_from_pixels,
    affine_matrix,
    affine_to_pixels,
    brightness_contrast,
    compose_affine,
    crop_affine,
    flip_affine,
    invert_affine,
    inverse_warp,
    valid_mask,
    warp,
)
from regpipe.functional.invariance import depth_weights, invariance_loss
from regpipe.functional.saliency import (
    mixed_saliency_loss,
    normalize_maps,
    saliency,
    saliency_consistency_loss,
    saliency_from_logits,
)
from regpipe.functional.losses import interpolated_loss, multi_hot_bce, soft_target_cross_entropy
from regpipe.functional.patchup import (
    block_mask,
    box_holes,
    cutmix_box,
    patchup_gamma,
    patchup_loss,
    patchup_mix,
    patchup_targets,
    unchanged_fraction,
)
from regpipe.functional.sign import sign
from regpipe.functional.partners import draw_mix_sources, draw_partners
from regpipe.functional.sum_mix import check_weights, gcc_coefficients, gcc_weights, mix_rows, mix_sources, sum_mix
from regpipe.functional.normalize import normalize
from regpipe.functional.tta import test_time_sum_predict

__all__ = [
    "affine_from_pixels",
    "affine_matrix",
    "affine_to_pixels",
    "brightness_contrast",
    "compose_affine",
    "normalize",
    "crop_affine",
    "depth_weights",
    "flip_affine",
    "invariance_loss",
    "invert_affine",
    "inverse_warp",
    "mixed_saliency_loss",
    "normalize_maps",
    "saliency",
    "saliency_consistency_loss",
    "saliency_from_logits",
    "sign",
    "valid_mask",
    "warp",
    "block_mask",
    "box_holes",
    "check_weights",
    "cutmix_box",
    "draw_mix_sources",
    "draw_partners",
    "gcc_coefficients",
    "gcc_weights",
    "interpolated_loss",
    "mix_rows",
    "mix_sources",
    "multi_hot_bce",
    "patchup_gamma",
    "patchup_loss",
    "patchup_mix",
    "patchup_targets",
    "soft_target_cross_entropy",
    "sum_mix",
    "test_time_sum_predict",
    "unchanged_fraction",
]

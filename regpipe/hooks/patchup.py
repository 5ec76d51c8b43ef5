"""PatchUp, model side: apply a :class:`~regpipe.core.patchup_plan.PatchUpPlan` inside any model.

PatchUp (Faramarzi et al. 2022, section 2) mixes blocks of the feature map at a layer drawn per
mini-batch and trains on the three-term loss of its eq. 6; the formulas are in
:mod:`regpipe.functional.patchup`.

The user names the candidate layers once; per step the hook mixes the output of the plan's layer
through a one-shot forward hook (or the inputs, for layer 0, through a forward pre-hook on the
model), records the realised unchanged fraction ``u`` and computes the PatchUp loss from it.
Between steps no hook is registered, so every other forward (evaluation, BN re-estimation) runs
untouched.

Example:
    >>> import torch
    >>> from regpipe import Batch
    >>> from regpipe.hooks import PatchUpHook
    >>> from regpipe.engine.models import preact_resnet_small
    >>> from regpipe.ops.patchup import PatchUp
    >>> model = preact_resnet_small(num_classes=4)
    >>> batch = Batch.from_labels(torch.rand(8, 3, 32, 32), torch.arange(8) % 4, num_classes=4)
    >>> batch = PatchUp(mode="soft", candidate_layers=(0, 1, 2))(batch)
    >>> with PatchUpHook(model, {1: "conv1", 2: "layer1"}) as hook:
    ...     logits = hook.forward(batch)
    ...     loss = hook.loss(logits, batch)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from regpipe.core.batch import Batch
from regpipe.functional.losses import soft_target_cross_entropy
from regpipe.core.patchup_plan import PatchUpPlan
from regpipe.functional.patchup import (LossKind, block_mask, box_holes, patchup_gamma, patchup_loss, patchup_mix,
                                        softmax_bce, unchanged_fraction)
from regpipe.hooks.tap import find_module, unwrap_model

__all__ = ["PatchUpHook", "plan_mask"]


def plan_mask(plan: PatchUpPlan, shape: torch.Size | tuple[int, ...], device: torch.device | str,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``holes`` mask (1 = altered) of ``plan`` for a feature map of ``shape`` ``(N, C, H, W)``.

    Faramarzi et al. (2020), section 2, "Binary Mask Creation": every feature is a block seed with
    probability ``gamma_adj = gamma / b^2 * (H * W) / ((H - b + 1) * (W - b + 1))`` (eq. 2) and each
    seed alters the ``b x b`` square around it (:func:`~regpipe.functional.patchup.block_mask`). The
    seeds, ``(C, H, W)`` (or ``(N, C, H, W)`` per sample), come from a generator on ``device`` seeded
    with ``plan.mask_seed``, so the same plan always gives the same mask. Layer 0: the CutMix box,
    ``(1, H, W)`` or ``(N, 1, H, W)``. An explicit ``plan.holes`` is returned as it is (in ``dtype``).

    This lives on the model side, not on the plan: the plan is core data and may not import the math.

    Raises:
        ValueError: the plan does not apply, ``shape`` is not 4-D, the row count differs from the plan's,
            or the block is larger than the map.
    """
    if not plan.apply:
        raise ValueError("this PatchUp plan does not apply (apply=False): there is no mask")
    if len(shape) != 4:
        raise ValueError(f"PatchUp mixes (N, C, H, W) maps, got shape {tuple(shape)}")
    n, c, height, width = (int(s) for s in shape)
    plan.check_rows(n)
    if plan.holes is not None:
        return plan.holes.to(device=device, dtype=dtype)
    if plan.layer == 0:
        return box_holes(plan.box.to(device), height, width, dtype)
    p = patchup_gamma(plan.gamma, plan.block_size, height, width)
    generator = torch.Generator(device=device).manual_seed(plan.mask_seed)
    seeds_shape = (n, c, height, width) if plan.per_sample else (c, height, width)
    seeds = (torch.rand(seeds_shape, generator=generator, device=device) < p).float()
    return block_mask(seeds, plan.block_size).to(dtype)


class PatchUpHook:
    """Apply PatchUp plans at named layers of any ``nn.Module`` (Faramarzi et al. 2022, eqs. 3-6, input space).

    Args:
        model: the model as it is called (possibly wrapped by DDP or ``torch.compile``).
        layers: ``{index: module name}`` with indices ``>= 1`` (index 0 is input space and needs no
            name), or a list of names numbered ``1..n``. Names are those of ``named_modules()`` of the
            unwrapped model (a wrapper's ``module.`` prefix is accepted too).

    Raises:
        ValueError: a name that no module has (the error lists a few valid names), or an index < 1.
    """

    def __init__(self, model: nn.Module, layers: dict[int, str] | list[str] | tuple[str, ...]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        if isinstance(layers, (list, tuple)):
            layers = {i + 1: name for i, name in enumerate(layers)}
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"layers must be a non-empty dict {{index: name}} or list of names, got {layers!r}")
        self.modules: dict[int, nn.Module] = {}
        for index, name in layers.items():
            if isinstance(index, bool) or not isinstance(index, int) or index < 1:
                raise ValueError(f"layer indices must be integers >= 1 (0 is input space), got {index!r}")
            module = find_module(model, name)
            self.modules[index] = module
        self.layers: dict[int, str] = dict(layers)
        self.plan: PatchUpPlan | None = None
        self.unchanged: torch.Tensor | None = None  # u of the last applied plan, 0-d or (N,)
        self._applied: PatchUpPlan | None = None
        self._handle: Any | None = None

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> "PatchUpHook":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove any registered hook and forget the plan; the model is left exactly as it was."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.plan = None

    # -- checking the layers before training ----------------------------------------------------
    def check_feature_maps(self, inputs: torch.Tensor) -> dict[int, tuple[int, ...]]:
        """Run the model once on ``inputs`` (e.g. one zero image of the training shape) and check that every
        named layer gives an ``(N, C, H, W)`` feature map, which PatchUp mixes; so a layer such as the
        classifier (``(N, K)``) is refused before training instead of at the step that first draws it.

        The forward runs without gradients, in eval mode (BatchNorm statistics and dropout untouched), on the
        unwrapped model (no DDP collectives) with temporary hooks; every module's mode is restored after.

        Returns:
            ``{layer index: shape of its output}``.

        Raises:
            ValueError: a layer that does not run in the forward, or that gives something other than a 4-D
                tensor (its index, name and what it gives are named).
        """
        outputs: dict[int, Any] = {}
        handles = [module.register_forward_hook(lambda m, args, out, i=i: outputs.setdefault(i, out))
                   for i, module in self.modules.items()]
        model = unwrap_model(self.model)
        modes = {module: module.training for module in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                model(inputs)
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes.items():
                module.training = mode
        shapes = {}
        for index, name in sorted(self.layers.items()):
            if index not in outputs:
                raise ValueError(f"PatchUp layer {index} ({name!r}) does not run in the model's forward: name a "
                                 "module the forward calls")
            out = outputs[index]
            if not isinstance(out, torch.Tensor) or out.dim() != 4:
                gives = f"a {tuple(out.shape)} tensor" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
                raise ValueError(f"PatchUp layer {index} ({name!r}) gives {gives}; PatchUp mixes (N, C, H, W) "
                                 "feature maps: name a convolutional layer or block")
            shapes[index] = tuple(out.shape)
        return shapes

    # -- applying a plan -------------------------------------------------------------------------
    def set_plan(self, plan: PatchUpPlan | None) -> None:
        """Arm ``plan`` for the next forward of the model (``None`` or ``apply=False``: a plain forward).

        Raises:
            ValueError: the plan's layer has no module in this hook.
        """
        self.close()
        self.unchanged, self._applied = None, None
        if plan is None or not plan.apply:
            self.plan = plan
            return
        if plan.layer == 0:
            self._handle = self.model.register_forward_pre_hook(self._pre_hook)
        elif plan.layer in self.modules:
            self._handle = self.modules[plan.layer].register_forward_hook(self._hook)
        else:
            raise ValueError(f"the plan mixes at layer {plan.layer}, this hook knows layers "
                             f"{sorted(self.layers)} (0 = input space)")
        self.plan = plan

    def _mix(self, h: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        if plan is None:  # only reachable if a caller keeps a stale handle
            raise RuntimeError("PatchUpHook fired without an armed plan")
        if not isinstance(h, torch.Tensor) or h.dim() != 4:
            raise ValueError(f"PatchUp at layer {plan.layer} ({self.layers.get(plan.layer, 'input')}) needs an "
                             f"(N, C, H, W) tensor, got {getattr(h, 'shape', type(h).__name__)}")
        plan.check_rows(h.shape[0])
        holes = plan_mask(plan, h.shape, h.device, h.dtype)
        mixed = patchup_mix(h, holes, plan.perm.to(h.device), plan.lam.to(h.device), plan.mode)
        # u of eq. 6: the unchanged fraction of one sample's mask (or of every row's, per sample).
        self.unchanged = unchanged_fraction(holes)
        self._applied = plan
        # One shot: the hook fires once per armed plan (a module called twice is mixed once).
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return mixed

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return self._mix(output)

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args:
            raise ValueError("PatchUp at layer 0 mixes the model's first positional argument; none was given")
        return (self._mix(args[0]), *args[1:])

    def forward(self, batch: Batch) -> torch.Tensor:
        """Run the model on ``batch.inputs`` with ``batch.patchup`` applied; returns the logits.

        Raises:
            ValueError: the plan was drawn for another batch size, or its layer never ran.
        """
        plan = batch.patchup
        if plan is not None and not isinstance(plan, PatchUpPlan):
            raise TypeError(f"batch.patchup must be a PatchUpPlan or None, got {type(plan).__name__}")
        if plan is not None:
            plan.check_rows(batch.size)
        self.set_plan(plan)
        try:
            logits = self.model(batch.inputs)
        finally:
            armed = self._handle is not None
            self.close()
        if armed:
            raise ValueError(f"the model never ran layer {plan.layer} ({self.layers.get(plan.layer)!r}) "
                             "during the forward: PatchUp was not applied")
        return logits

    # -- the loss --------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, batch: Batch, kind: LossKind = "bce",
             loss_alpha: float = 1.0, loss_beta: float = 1.0) -> torch.Tensor:
        """The PatchUp loss of the last forward (Faramarzi et al. 2022, eq. 6), or the plain loss when no plan applied.

        Plain steps use the same ``kind`` on ``batch.targets``: BCE on softmax probabilities (as the
        official plain step does) or soft-target cross-entropy.

        Args:
            logits: ``(N, K)`` outputs of the forward that applied ``batch.patchup``.
            batch: the batch carrying the plan and ``(N, K)`` targets.
            kind: ``"bce"`` (official) or ``"ce"``.
            loss_alpha: weight of the ``target_a`` term.
            loss_beta: weight of the ``target_rw`` term.

        Returns:
            Scalar float32 loss.

        Raises:
            ValueError: shapes mismatch, or the hook did not apply this batch's plan.
        """
        if kind not in ("bce", "ce"):
            raise ValueError(f"kind must be 'bce' or 'ce', got {kind!r}")
        if logits.dim() != 2 or logits.shape != batch.targets.shape:
            raise ValueError(f"logits {tuple(logits.shape)} do not match the batch targets {tuple(batch.targets.shape)}")
        plan = batch.patchup
        if plan is None or not plan.apply:
            y = batch.targets.float()
            if kind == "bce":
                log_probs = F.log_softmax(logits.float(), dim=1)
                return softmax_bce(log_probs.exp(), log_probs, y).mean()
            return soft_target_cross_entropy(logits, y)
        if self._applied is not plan or self.unchanged is None:
            raise ValueError("this hook did not apply the batch's PatchUp plan in its last forward; "
                             "call hook.forward(batch) (or set_plan(batch.patchup) and the model) first")
        return patchup_loss(logits, batch.targets, plan.perm.to(logits.device), plan.lam.to(logits.device),
                            self.unchanged.to(logits.device), plan.mode, kind=kind,
                            loss_alpha=loss_alpha, loss_beta=loss_beta)

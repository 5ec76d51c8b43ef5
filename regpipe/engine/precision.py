"""Mixed precision for ``regpipe train --amp bf16|fp16``.

The forward pass and the loss run under ``torch.autocast`` (matrix products and convolutions in the
low-precision type, reductions and the loss in float32; the weights stay float32). ``fp16`` has 5 exponent
bits, so small gradients underflow: its loss is multiplied by a dynamic scale before ``backward`` and the
gradients divided by it before the step (Micikevicius et al. 2018, "Mixed Precision Training", section 3.2),
the scale halved when a step overflows and doubled after 2000 clean steps (``torch.amp.GradScaler``).
``bf16`` keeps float32's exponent range and needs no scaling.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

__all__ = ["AMP_MODES", "Precision"]

AmpMode = Literal["off", "bf16", "fp16"]
AMP_MODES = ("off", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast context and gradient scaling for one run.

    Args:
        mode: ``"off"`` (float32), ``"bf16"`` or ``"fp16"``.
        device: the training device (its type selects the autocast backend).

    Raises:
        ValueError: an unknown mode (named).
    """

    def __init__(self, mode: AmpMode, device: torch.device) -> None:
        if mode not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=mode == "fp16")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's context: ``torch.autocast`` in the mode's type, or nothing."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.mode])

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and ``optimizer.step()``, through the gradient scaler in ``fp16``."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return {"mode": self.mode, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode") != self.mode:
            raise ValueError(f"the saved state was trained with amp={state.get('mode')!r}, this run uses {self.mode!r}")
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])

"""Model checkpoints: what ``regpipe train --checkpoint-out`` writes and ``regpipe sign`` reads.

A checkpoint is a ``torch.save``d dict of plain values (loadable with ``weights_only=True``): the
model name as ``build_model`` takes it, ``num_classes``, ``in_channels``, the image shape, the
unwrapped model's ``state_dict``, the per-channel normalisation ``mean``/``std`` (0..1 scale) the model
was trained with, and the training config.

Example:
    >>> import tempfile, torch
    >>> from regpipe.engine.checkpoint import load_checkpoint, save_checkpoint
    >>> from regpipe.engine.models import build_model
    >>> net = build_model("preact-small", num_classes=4, in_channels=1)
    >>> path = tempfile.mkdtemp() + "/model.pt"
    >>> _ = save_checkpoint(path, net, "preact-small", 4, (1, 28, 28), mean=(0.5,), std=(0.25,))
    >>> ckpt = load_checkpoint(path)
    >>> ckpt.model_name, ckpt.num_classes, ckpt.in_channels, ckpt.mean
    ('preact-small', 4, 1, (0.5,))
    >>> load_checkpoint(path, model_name="preact-resnet18")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: checkpoint ... was trained with model 'preact-small', but model 'preact-resnet18' was asked for
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from regpipe.core.files import atomic_write
from regpipe.hooks.tap import unwrap_model
from regpipe.engine.models import build_model

__all__ = ["FORMAT", "Checkpoint", "load_checkpoint", "save_checkpoint"]

#: Marks a regpipe checkpoint (the ``format`` key) and its layout version.
FORMAT = ("regpipe-checkpoint", 1)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode, on the requested device) and its metadata."""

    model: nn.Module
    model_name: str
    num_classes: int
    in_channels: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | Path, model: nn.Module, model_name: str, num_classes: int,
                    image_shape: Sequence[int], mean: Sequence[float], std: Sequence[float],
                    config: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (unwrapped from DDP/``torch.compile``) and its metadata to ``path`` atomically.

    Args:
        model_name: the ``build_model`` name (``preact-small``, ``package.module:factory``).
        image_shape: ``(C, H, W)`` of the inputs; ``C`` is the ``in_channels`` the model is rebuilt with.
        mean, std: the per-channel normalisation (0..1 scale) the model was trained with.
        config: plain values (the training config), stored for reference.
    """
    shape = tuple(int(v) for v in image_shape)
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    if len(mean) != shape[0] or len(std) != shape[0]:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {shape[0]} channels")
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    payload = {"format": FORMAT[0], "version": FORMAT[1], "model": str(model_name), "num_classes": int(num_classes),
               "in_channels": shape[0], "image_shape": list(shape), "mean": [float(v) for v in mean],
               "std": [float(v) for v in std], "config": dict(config or {}), "state_dict": state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | Path, model_name: str | None = None, num_classes: int | None = None,
                    in_channels: int | None = None, device: torch.device | str = "cpu") -> Checkpoint:
    """Rebuild the model a checkpoint was written from, in eval mode on ``device``.

    ``model_name``/``num_classes``/``in_channels``, when given, are what the caller expects: a
    checkpoint of something else is an error naming both sides.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a regpipe checkpoint, an expectation that does not match, a state dict that does
            not fit the architecture (missing/unexpected keys and shape mismatches are named), or weights
            that are not finite (the parameter is named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle error, a truncated file, ...: all mean "not a checkpoint we can read"
        raise ValueError(f"{path} is not a readable regpipe checkpoint: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT[0]:
        raise ValueError(f"{path} is not a regpipe checkpoint (write one with `regpipe train --checkpoint-out`)")
    if payload.get("version") != FORMAT[1]:
        raise ValueError(f"{path} has checkpoint version {payload.get('version')}, this regpipe reads {FORMAT[1]}")
    expected = {"model": model_name, "num_classes": num_classes, "in_channels": in_channels}
    for key, want in expected.items():
        if want is not None and payload[key] != want:
            raise ValueError(f"checkpoint {path} was trained with {key.replace('_', ' ')} {payload[key]!r}, "
                             f"but {key.replace('_', ' ')} {want!r} was asked for")
    model = build_model(payload["model"], num_classes=payload["num_classes"], in_channels=payload["in_channels"])
    what = f"checkpoint {path} (model {payload['model']!r})"
    _load_state(model, payload["state_dict"], what)
    _check_finite_state(model, payload["state_dict"], what)
    return Checkpoint(model=model.to(device).eval(), model_name=payload["model"], num_classes=payload["num_classes"],
                      in_channels=payload["in_channels"], image_shape=tuple(payload["image_shape"]),
                      mean=tuple(payload["mean"]), std=tuple(payload["std"]), config=dict(payload["config"]))


def _check_finite_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse a state whose weights are not finite: a model that diverged while training (NaN weights)
    predicts one class for every input, and any accuracy measured on it would look like a result.

    Parameters must be finite; buffers must not be NaN (an infinite buffer can be meant, e.g. a ``-inf``
    attention mask, while a NaN is never a value on purpose).

    Raises:
        ValueError: the first offending entry, its kind, the count of bad values and one of them are named.
    """
    parameters = {name for name, _ in model.named_parameters()}
    for name, tensor in state.items():
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        kind = "parameter" if name in parameters else "buffer"
        bad = ~torch.isfinite(tensor) if kind == "parameter" else torch.isnan(tensor)
        if bool(bad.any()):
            count, first = int(bad.sum()), tensor.flatten()[bad.flatten()][0].item()
            raise ValueError(f"{what}: {kind} {name!r} holds {count} non-finite value(s) of {tensor.numel()} "
                             f"(e.g. {first}); the model diverged while it was trained: retrain it (e.g. with a "
                             "lower --lr)")


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise ValueError(f"{what} does not fit the {type(model).__name__} built for it: {'; '.join(parts)}")
    model.load_state_dict(state)

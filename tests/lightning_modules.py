"""A small LightningModule with regpipe, shared by the Lightning tests and their DDP probe script."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from regpipe.core.batch import Batch
from regpipe.integrations.lightning import RegpipeCallback, RegpipeModule


def tiny_net(num_classes: int = 4) -> nn.Module:
    """Two conv stages with BatchNorm, named ``layer1``/``layer2`` as the invariance layers, then a linear head."""
    net = nn.Sequential()
    net.add_module("layer1", nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    net.add_module("layer2", nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    net.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)))
    return net


def tiny_data(n: int = 64, seed: int = 0, num_classes: int = 4, indices: bool = False) -> TensorDataset:
    """``n`` uint8 1x12x12 images whose class shows as a brighter quadrant (learnable), labels ``i % K``
    (and each row's index, with ``indices``)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 128, (n, 1, 12, 12), dtype=torch.uint8, generator=generator)
    labels = torch.arange(n) % num_classes
    for c in range(num_classes):
        rows, cols = divmod(c, 2)
        images[labels == c, :, rows * 6:(rows + 1) * 6, cols * 6:(cols + 1) * 6] += 120
    return TensorDataset(images, labels, torch.arange(n)) if indices else TensorDataset(images, labels)


class Classifier(RegpipeModule):
    """An ordinary classifier plus the regpipe lines: ``self.regpipe`` and ``self.regpipe_loss`` in
    ``training_step``. Records what each training step saw (rows, whether the batch was mixed, the
    gradual ``t`` before the step, the sum groups ``k``) in :attr:`seen`."""

    def __init__(self, regpipe: RegpipeCallback, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny_net()
        self.regpipe = regpipe
        self.lr = lr
        self.seen: list[dict[str, Any]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        ops = {type(op).__name__: op for op in self.regpipe.ops}
        gradual, mix = ops.get("GradualSumMix"), ops.get("SumMix")
        self.seen.append({"rows": batch.size, "mixed": batch.mixing is not None, "dtype": batch.inputs.dtype,
                          "t": gradual.t if gradual is not None else None,
                          "k": mix.groups if mix is not None else None, "epoch": self.current_epoch,
                          "ids": batch.source_ids.tolist()})
        return self.regpipe_loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loaders(batch_size: int = 8, n: int = 64, indices: bool = False) -> tuple[DataLoader, DataLoader]:
    """A training loader (no shuffle, so a resumed run reads what the uninterrupted one read; yielding each row's
    index with ``indices``) and a validation one."""
    return (DataLoader(tiny_data(n, seed=0, indices=indices), batch_size=batch_size),
            DataLoader(tiny_data(32, seed=1), batch_size=16))


def trainer(root: str, **kwargs: Any) -> L.Trainer:
    """A quiet CPU Trainer writing under ``root``."""
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=root, deterministic=True)
    settings.update(kwargs)
    return L.Trainer(**settings)

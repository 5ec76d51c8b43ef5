"""``regpipe show replicate|saliency``: in-batch replication and saliency maps warped back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from regpipe.core.batch import Batch
from regpipe.core.files import atomic_write
from regpipe.engine.data import load_fashion_mnist
from regpipe.functional.augment import inverse_warp, valid_mask
from regpipe.functional.saliency import normalize_maps, saliency
from regpipe.ops.augment import Replicate

__all__ = ["draw_replicate", "draw_saliency"]


def _seeds(data_dir: str | None, seed: int, count: int) -> Batch:
    data = load_fashion_mnist("test", data_dir=data_dir, shape="cifar")
    if len(data.labels) < count:
        raise ValueError(f"regpipe show needs at least {count} test images, the dataset has {len(data.labels)}")
    pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[:count]
    return Batch.from_labels(data.images[pick].float().div_(255.0), data.labels[pick], data.num_classes,
                             source_ids=pick)


def _panel(ax: Any, image: torch.Tensor, title: str = "", cmap: str = "gray") -> None:
    ax.imshow(image.numpy(), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=7)


def _save(plt: Any, fig: Any, out: Path) -> Path:
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # a killed run leaves no half PNG
    plt.close(fig)
    return out


def draw_replicate(plt: Any, out: Path, data_dir: str | None, seed: int, m: int = 6) -> Path:
    """Four seeds, each with its ``m`` copies (the first is the original), as the replication recipes draw them."""
    from regpipe.engine.algorithms import replication_augment

    batch = Replicate(m, replication_augment(seed))(_seeds(data_dir, seed, 4))
    fig, axes = plt.subplots(4, m, figsize=(1.5 * m, 6.4))
    for row in range(batch.size):
        s, j = divmod(row, m)
        theta = batch.affine[row]
        b, c = batch.photometric[row].tolist()
        title = "original" if j == 0 else f"A=[{theta[0, 0]:.2f} {theta[0, 1]:.2f}; {theta[1, 0]:.2f} {theta[1, 1]:.2f}]" \
                                          f"\nb={b:.2f} c={c:.2f}"
        _panel(axes[s, j], batch.inputs[row, 0].clamp(0, 1), title)
        if j == 0:
            axes[s, j].set_ylabel(f"seed {int(batch.source_ids[row])}", fontsize=7)
    fig.suptitle(f"In-batch replication: each seed becomes m={m} rows (flip, affine, brightness/contrast)")
    return _save(plt, fig, out)


def draw_saliency(plt: Any, out: Path, data_dir: str | None, seed: int, steps: int = 60) -> Path:
    """Original and augmented saliency maps, before and after the inverse warp, for three seeds.

    A small model is first trained for ``steps`` SGD steps on the training split so the maps show
    more than initialisation noise."""
    from regpipe.engine.models import preact_resnet_small
    from regpipe.engine.algorithms import replication_augment

    torch.manual_seed(seed)
    train = load_fashion_mnist("train", data_dir=data_dir, shape="cifar")
    model = preact_resnet_small(num_classes=train.num_classes, in_channels=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(train.labels), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(train.images[idx].float() / 255.0), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    batch = Replicate(2, replication_augment(seed + 1))(_seeds(data_dir, seed, 3))
    maps = saliency(model, batch.inputs, batch.targets).detach()
    h, w = maps.shape[-2:]
    back = inverse_warp(maps.unsqueeze(1), batch.affine).squeeze(1)
    mask = valid_mask(batch.affine, h, w).squeeze(1)
    columns = ["original", "its saliency", "augmented", "its saliency", "warped back", "|difference|"]
    fig, axes = plt.subplots(3, len(columns), figsize=(1.7 * len(columns), 5.6))
    for s in range(3):
        o, a = 2 * s, 2 * s + 1
        ref = normalize_maps(maps[o:o + 1], mask[a:a + 1])[0]
        restored = normalize_maps(back[a:a + 1], mask[a:a + 1])[0]
        panels = [batch.inputs[o, 0].clamp(0, 1), normalize_maps(maps[o:o + 1])[0], batch.inputs[a, 0].clamp(0, 1),
                  normalize_maps(maps[a:a + 1])[0], restored, (restored - ref).abs()]
        for c, (panel, title) in enumerate(zip(panels, columns)):
            _panel(axes[s, c], panel, title if s == 0 else "", cmap="gray" if c in (0, 2) else "magma")
    fig.suptitle("Saliency consistency: T^-1(S(T(x))) against S(x); pixels that left the frame are masked")
    return _save(plt, fig, out)

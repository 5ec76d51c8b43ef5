"""``regpipe show sign``: inputs before and after SIGN (K = 50, 100) and the perturbation delta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from regpipe.core.files import atomic_write
from regpipe.engine.checkpoint import load_checkpoint
from regpipe.engine.data import ImageArrays, load_fashion_mnist, stratified_indices
from regpipe.functional.losses import soft_target_cross_entropy
from regpipe.functional.normalize import normalize
from regpipe.engine.models import preact_resnet_small
from regpipe.engine.sign_dataset import transform_images

__all__ = ["draw_sign", "fit_quick_teacher"]

_COLUMNS = 6
_ITERS = (50, 100)


def fit_quick_teacher(arrays: ImageArrays, seed: int, per_class: int = 100, epochs: int = 3
                      ) -> tuple[torch.nn.Module, tuple[float, ...], tuple[float, ...], str]:
    """A small model fitted for a picture (SIGN needs a trained model): the default PreAct-ResNet, ``epochs``
    epochs of SGD on ``per_class`` samples per class (fewer when the data has fewer). Returns the model in
    eval mode, its normalisation and a one-line description."""
    counts = torch.bincount(arrays.labels, minlength=arrays.num_classes)
    per_class = int(min(per_class, counts[counts > 0].min()))
    train = arrays.subset(stratified_indices(arrays.labels, per_class, seed=seed))
    pixels = train.images.float().div_(255.0)
    mean = tuple(pixels.mean(dim=(0, 2, 3)).tolist())
    std = tuple(pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    torch.manual_seed(seed)
    model = preact_resnet_small(num_classes=arrays.num_classes, in_channels=train.images.shape[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x_all = normalize(train.images, torch.tensor(mean), torch.tensor(std))
    y_all = torch.nn.functional.one_hot(train.labels, arrays.num_classes).float()
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train), generator=order).split(64):
            loss = soft_target_cross_entropy(model(x_all[idx]), y_all[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval(), mean, std, f"teacher: preact-small fitted {epochs} epochs on {len(train)} images"


def draw_sign(plt: Any, out: Path, data_dir: str | None, seed: int, checkpoint: str | None = None) -> Path:
    """Rows: test images, their SIGN iterates at K = 50 and 100 (pixel scale, one shared grey range so that
    values leaving [0, 1] show), and the delta ``p*_100 - p`` (red: brighter, blue: darker)."""
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        shape = "native" if tuple(ckpt.image_shape) == (1, 28, 28) else "cifar"
        data = load_fashion_mnist("test", data_dir=data_dir, shape=shape)
        model, mean, std = ckpt.model, ckpt.mean, ckpt.std
        about = f"teacher: {Path(checkpoint).name} ({ckpt.model_name})"
    else:
        model, mean, std, about = fit_quick_teacher(load_fashion_mnist("train", data_dir=data_dir, shape="cifar"),
                                                    seed)
        data = load_fashion_mnist("test", data_dir=data_dir, shape="cifar")
    columns = min(_COLUMNS, len(data.labels))
    pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[:columns]
    before = data.images[pick].float().div_(255.0)
    after = transform_images(model, data.images[pick], mean, std, _ITERS)
    delta = after[_ITERS[-1]] - before
    lo = min(0.0, float(torch.cat([a.flatten() for a in after.values()]).quantile(0.01)))
    hi = max(1.0, float(torch.cat([a.flatten() for a in after.values()]).quantile(0.99)))
    span = float(delta.abs().flatten().quantile(0.99)) or 1.0
    rows = [("input p", before, "gray", 0.0, 1.0)]
    rows += [(f"K={k}\n[{lo:.2f}, {hi:.2f}]", after[k], "gray", lo, hi) for k in _ITERS]
    rows.append((f"delta, K={_ITERS[-1]}\n±{span:.2f}", delta, "RdBu_r", -span, span))
    fig, axes = plt.subplots(len(rows), columns, figsize=(1.6 * columns + 1.0, 1.7 * len(rows) + 0.6), squeeze=False)
    for r, (title, images, cmap, vmin, vmax) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.imshow(images[c].mean(dim=0).numpy(), cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(data.classes[int(data.labels[pick[c]])].split("/")[0][:10], fontsize=7)
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.suptitle(f"SIGN (eta=1, delta at the current iterate); {about}", fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # a killed run leaves no half PNG
    plt.close(fig)
    return out

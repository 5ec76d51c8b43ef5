"""``regpipe show``: pictures of what an op does, on real Fashion-MNIST images."""

from __future__ import annotations

import argparse

from pathlib import Path

import torch

from regpipe.core.files import atomic_write
from regpipe.core.optional import require
from regpipe.engine.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from regpipe.engine.validate import check_output_path
from regpipe.functional.sum_mix import gcc_weights, sum_mix

__all__ = ["show", "mixed_grid", "draw_patchup"]

_COLUMNS = 6
#: What ``regpipe show`` can draw.
SHOWABLE = ("sum", "gradual", "patchup", "replicate", "saliency", "sign")


def mixed_grid(images: torch.Tensor, weight_rows: list[torch.Tensor], columns: int) -> list[torch.Tensor]:
    """For each weight vector ``w`` (k,), the ``columns`` rows of ``sum_mix`` in group mode.

    ``images``: ``(>= k * columns, C, H, W)`` uint8. Returns one ``(columns, C, H, W)`` float tensor per row.
    """
    out = []
    for w in weight_rows:
        k = w.numel()
        x = images[: k * columns]
        y = torch.zeros(x.shape[0], 1)
        mixed, _ = sum_mix(x, y + 1.0, w)
        out.append(mixed / 255.0)
    return out


def show(what: str, out: Path, data_dir: str | None = None, seed: int = 0, checkpoint: str | None = None) -> Path:
    """Draw ``what`` (``"sum"`` or ``"gradual"``) into the PNG ``out``."""
    require("matplotlib", needed_by="regpipe show").use("Agg")
    import matplotlib.pyplot as plt
    if what not in SHOWABLE:
        raise ValueError(f"cannot show {what!r}: choose from {', '.join(SHOWABLE)}")
    if what == "patchup":
        return draw_patchup(plt, out, data_dir, seed)
    if what == "sign":  # `checkpoint`: the model to transform with (default: one fitted on the spot)
        from regpipe.cli.show_sign import draw_sign
        return draw_sign(plt, out, data_dir, seed, checkpoint)
    if what in ("replicate", "saliency"):
        from regpipe.cli.show_consistency import draw_replicate, draw_saliency
        return (draw_replicate if what == "replicate" else draw_saliency)(plt, out, data_dir, seed)
    data = load_fashion_mnist("test", data_dir=data_dir, shape="native")
    columns = min(_COLUMNS, len(data.labels) // 8)
    if columns < 1:
        raise ValueError(f"regpipe show needs at least 8 test images, the dataset has {len(data.labels)}")
    pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[: 8 * columns]
    images, labels = data.images[pick], data.labels[pick]

    if what == "sum":
        ks = [1, 2, 4, 8]
        weight_rows = [torch.full((k,), 1.0 / k) for k in ks]
        row_titles = [f"k={k}" for k in ks]
    else:
        ts = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
        weight_rows = [gcc_weights(4, t) for t in ts]
        row_titles = [f"t={t:.1f}\n" + " ".join(f"{c:.2f}" for c in w.tolist()) for t, w in zip(ts, weight_rows)]
    grids = mixed_grid(images, weight_rows, columns)
    n_rows = len(grids) + (1 if what == "gradual" else 0)
    fig = plt.figure(figsize=(1.6 * columns + 1.5, 1.6 * n_rows + 0.5))
    for r, (grid, w, title) in enumerate(zip(grids, weight_rows, row_titles)):
        for c in range(columns):
            ax = fig.add_subplot(n_rows, columns, r * columns + c + 1)
            ax.imshow(grid[c, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            members = [FASHION_MNIST_CLASSES[int(labels[g * columns + c])] for g in range(w.numel()) if w[g] > 0]
            ax.set_title(" + ".join(m.split("/")[0][:7] for m in members[:2]) + (" ..." if len(members) > 2 else ""),
                         fontsize=6)
            if c == 0:
                ax.set_ylabel(title, fontsize=7)
    if what == "gradual":
        ax = fig.add_subplot(n_rows, 1, n_rows)
        ts = torch.linspace(0, 1, 201)
        coeffs = torch.stack([gcc_weights(4, float(t)) for t in ts])
        for j in range(coeffs.shape[1]):
            ax.plot(ts.numpy(), coeffs[:, j].numpy(), label=f"c{j}")
        ax.set_xlabel("t (progress of the gradual phase)")
        ax.set_ylabel("GCC weight, k0=4")
        ax.legend(fontsize=7, ncol=4)
        ax.grid(alpha=0.3)
    fig.suptitle("Sum Augmentation: group mix for k = 1, 2, 4, 8" if what == "sum"
                 else "Gradually Cascading Sum Augmentation (k0 = 4): mixes and coefficients along t")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # a killed run leaves no half PNG
    plt.close(fig)
    return out


def draw_patchup(plt, out: Path, data_dir: str | None, seed: int) -> Path:
    """PatchUp on real images: per layer (0 = input CutMix, 1 = after the stem conv, 2 = after the first
    stage of the default model) the mask of one channel, a row's feature map, its partner's, and the
    hard and soft mixes (Faramarzi et al., 2022, section 3). The model is freshly initialised: the picture shows where
    features are exchanged, not what a trained network computes."""
    from regpipe.functional.patchup import patchup_mix
    from regpipe.engine.models import preact_resnet_small
    from regpipe.core.batch import Batch
    from regpipe.hooks.patchup import plan_mask
    from regpipe.ops.patchup import PatchUp

    data = load_fashion_mnist("test", data_dir=data_dir, shape="cifar")
    pick = torch.randperm(len(data.labels), generator=torch.Generator().manual_seed(seed))[:8]
    x = data.images[pick].float().div_(255.0)
    torch.manual_seed(seed)
    model = preact_resnet_small().eval()
    with torch.no_grad():
        features = {0: x, 1: model.conv1(x)}
        features[2] = model.layer1(features[1])
    columns = ["mask (1 = altered)", "row 0", "its partner", "hard mix", "soft mix"]
    fig, axes = plt.subplots(3, len(columns), figsize=(2.2 * len(columns), 7.2))
    for layer, h in features.items():
        op = PatchUp(mode="soft", candidate_layers=(layer,), patchup_prob=1.0, seed=seed + layer)
        plan = op.draw(Batch.from_labels(x, data.labels[pick], num_classes=10))
        holes = plan_mask(plan, h.shape, "cpu")
        lam = plan.lam
        hard = patchup_mix(h, holes, plan.perm, lam, "hard")
        soft = patchup_mix(h, holes, plan.perm, lam, "soft" if layer else "hard")
        partner = int(plan.perm[0])
        panels = [holes.reshape(-1, *holes.shape[-2:])[0], h[0, 0], h[partner, 0], hard[0, 0], soft[0, 0]]
        for c, (panel, title) in enumerate(zip(panels, columns)):
            ax = axes[layer, c]
            ax.imshow(panel.numpy(), cmap="gray" if c else "magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if layer == 0:
                ax.set_title(title, fontsize=9)
        name = {0: "layer 0: input\n(CutMix box)", 1: "layer 1: conv1", 2: "layer 2: layer1"}[layer]
        axes[layer, 0].set_ylabel(f"{name}\nu={float(1 - holes.float().mean()):.2f}, lam={float(lam):.2f}", fontsize=8)
    fig.suptitle("PatchUp (official CIFAR soft setting: gamma=0.75, block 7): channel 0 of each layer")
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))  # a killed run leaves no half PNG
    plt.close(fig)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    """``regpipe show``: draw what an op does into a PNG."""
    p = sub.add_parser("show", help="draw what an op does into a PNG",
                            description="sum: images mixed with k = 1, 2, 4, 8. gradual: mixes along t and the GCC "
                                        "coefficients against t. patchup: masks and mixed feature maps at the input, "
                                        "after the stem conv and after the first stage. replicate: seeds and their "
                                        "augmented copies. saliency: saliency maps of originals and copies, "
                                        "before and after the inverse warp. sign: inputs before and after SIGN "
                                        "(K = 50, 100) and the perturbation delta.")
    p.add_argument("what", choices=SHOWABLE, help="which op to draw")
    p.add_argument("--out", default=None, help="PNG path (default: regpipe-show-WHAT.png)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (see `regpipe train --help`)")
    p.add_argument("--seed", type=int, default=0, help="which images are drawn")
    p.add_argument("--checkpoint", default=None,
                        help="sign: the trained model to transform with (default: a small model fitted on the spot)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out is not None else Path(f"regpipe-show-{args.what}.png")
    check_output_path("--out", out, "file")  # before any data is read or model fitted
    path = show(args.what, out, data_dir=args.data_dir, seed=args.seed, checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return 0

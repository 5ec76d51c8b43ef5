"""``Trainer.fit`` of gradual+invariance under Lightning's DDP on 2 CPU processes (gloo), for test_lightning.py.

Usage: python lightning_ddp_probe.py DEST_DIR. Lightning starts the second process by running this script
again; each process writes DEST_DIR/rank<R>.json: its optimizer steps, the gradual ``t``, its ops'
generator seeds, the source ids it trained on, and a checksum of its weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lightning_modules import Classifier, loaders, trainer
from regpipe.engine.config import GradualConfig, InvarianceConfig, ReplicationConfig
from regpipe.integrations.lightning import RegpipeCallback


def main() -> None:
    dest = Path(sys.argv[1])
    regpipe = RegpipeCallback("gradual+invariance", num_classes=4, seed=3, gradual=GradualConfig(k0=2, mode="permute"),
                              replication=ReplicationConfig(replicas=2),
                              invariance=InvarianceConfig(layers=("net.layer1", "net.layer2")))
    model = Classifier(regpipe)
    fit = trainer(str(dest), max_epochs=2, strategy="ddp", devices=2)
    train, val = loaders(batch_size=4, indices=True)  # ids: the dataset's indices
    fit.fit(model, train, val)
    gradual, replicate, _ = regpipe.state_dict()["algorithms"]  # kept after the fit (its teardown)
    report = {"rank": fit.global_rank, "world_size": fit.world_size, "global_step": fit.global_step,
              "step_count": gradual["ops"][0]["step_count"], "gradual_seed": gradual["ops"][0]["rng"]["seed"],
              "augment_seed": replicate["ops"][0]["augment"]["rng"]["seed"], "rows": [s["rows"] for s in model.seen],
              "ids": sorted({i for s in model.seen if s["epoch"] == 0 for i in s["ids"]}),
              "weights": float(sum(p.double().sum() for p in model.parameters())),
              "invariance": float(fit.callback_metrics["regpipe/invariance"])}
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"rank{fit.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

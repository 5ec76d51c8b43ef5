"""The Lightning integration (issue 22, part 3): regpipe's recipes inside ``Trainer.fit`` on CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning as L  # noqa: E402

from lightning_modules import Classifier, loaders, trainer  # noqa: E402
from regpipe.engine.cascade import Cascade  # noqa: E402
from regpipe.engine.config import CascadeConfig, GradualConfig, InvarianceConfig, ReplicationConfig  # noqa: E402
from regpipe.core.optional import install_hint  # noqa: E402
from regpipe.engine.distributed import rank_seed  # noqa: E402
from regpipe.integrations.lightning import RegpipeCallback  # noqa: E402

TESTS = Path(__file__).resolve().parent
LAYERS = InvarianceConfig(layers=("net.layer1", "net.layer2"))


def gradual_invariance(seed: int = 0) -> RegpipeCallback:
    return RegpipeCallback("gradual+invariance", num_classes=4, seed=seed, gradual=GradualConfig(k0=2, mode="permute"),
                           replication=ReplicationConfig(replicas=2), invariance=LAYERS)


class MetricRecorder(L.Callback):
    """The validation metric after each validation (runs before the regpipe callback, which the module adds)."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.values.append(float(trainer.callback_metrics["val_acc"]))


def test_fit_runs_the_device_ops_advances_t_per_optimizer_step_and_logs_the_invariance_term(tmp_path: Path) -> None:
    model = Classifier(gradual_invariance())
    fit = trainer(str(tmp_path), max_epochs=2, accumulate_grad_batches=2)
    fit.fit(model, *loaders(batch_size=8))

    seen = model.seen
    assert len(seen) == 16 and fit.global_step == 8  # 8 batches per epoch, one optimizer step every 2
    assert all(s["rows"] == 16 for s in seen)  # 8 seeds x 2 copies, on the device (permutation mode keeps rows)
    assert all(s["dtype"] == torch.float32 for s in seen)  # uint8 converted on the device
    # t = optimizer steps / gradual_steps, gradual_steps = round(2 epochs * 0.8) * 4 steps per epoch = 8:
    # it advances every second batch (accumulate_grad_batches=2), not every batch
    assert [s["t"] for s in seen] == [(i // 2) / 8 for i in range(16)]
    assert [s["mixed"] for s in seen] == [True] * 16  # t < 1 before every step of this budget
    state = model.regpipe.state_dict()["algorithms"][0]["ops"][0]
    assert state["step_count"] == 8 and state["gradual_steps"] == 8
    logged = fit.callback_metrics
    assert math.isfinite(float(logged["regpipe/invariance"])) and float(logged["regpipe/invariance"]) > 0
    assert float(logged["regpipe/t"]) == 1.0 and float(logged["regpipe/m"]) == 2.0
    assert "regpipe/task" in logged
    assert not model.regpipe.attached  # the fit's teardown took the invariance hooks off the model
    assert not model.net.layer1._forward_hooks and not model.net.layer2._forward_hooks


def test_cascade_switches_stages_on_validation_as_the_controller_decides(tmp_path: Path) -> None:
    cascade = CascadeConfig(stages=(4, 2, 1), patience=1)
    model = Classifier(RegpipeCallback("cascade", num_classes=4, cascade=cascade), lr=0.2)
    recorder = MetricRecorder()
    fit = trainer(str(tmp_path), max_epochs=6, callbacks=[recorder])
    fit.fit(model, *loaders(batch_size=8))

    ks = [next(s["k"] for s in model.seen if s["epoch"] == e) for e in sorted({s["epoch"] for s in model.seen})]
    # the reference: the controller alone, fed the same validation accuracies (6 epochs / 3 stages: 2 each)
    reference, expected, finished = Cascade(stages=(4, 2, 1), patience=1, stage_epochs=[2, 2, 2]), [4], False
    for value in recorder.values:
        event = reference.report(value)
        finished = event.finished
        expected.append(event.k)
        if finished:
            break
    assert ks == expected[:len(ks)]
    assert ks[0] == 4 and ks[-1] < 4  # at least one switch happened, at a validation's end
    assert len(ks) == len(recorder.values) or not finished
    assert fit.current_epoch == len(recorder.values)  # stopped where the controller finished (or at max_epochs)
    assert all(s["rows"] == 8 // s["k"] for s in model.seen)  # group mode: 8 rows -> 8/k mixed rows


class BatchNormProbe(L.Callback):
    """The first BatchNorm's running mean as validation sees it, the expected clean re-estimate (the per-channel
    mean of the first conv's output over the clean training images, which the 8 batches of an epoch hold), and
    the running mean before and after the validation."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images, self.during, self.expected, self.before, self.after = images, [], [], [], []

    def bn(self, module: L.LightningModule) -> torch.nn.BatchNorm2d:
        return module.net.layer1[1]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            self.before.append(self.bn(pl_module).running_mean.clone())

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.during.append(self.bn(pl_module).running_mean.clone())
            with torch.no_grad():
                self.expected.append(pl_module.net.layer1[0](self.images.float() / 255).mean(dim=(0, 2, 3)))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.after.append(self.bn(pl_module).running_mean.clone())


def test_validation_while_mixing_reads_batchnorm_statistics_of_clean_batches(tmp_path: Path) -> None:
    train, val = loaders(batch_size=8)
    probe = BatchNormProbe(train.dataset.tensors[0])
    model = Classifier(RegpipeCallback("gradual", num_classes=4, gradual=GradualConfig(k0=2)))
    trainer(str(tmp_path), max_epochs=2, callbacks=[probe]).fit(model, train, val)
    assert len(probe.during) == 2
    # epoch 1's validation: t = 0.5, the inputs mixed: statistics re-estimated on the clean batches seen
    torch.testing.assert_close(probe.during[0], probe.expected[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(probe.before[0], probe.during[0], atol=1e-3)  # not the statistics of mixed rows
    for before, after in zip(probe.before, probe.after):  # training goes on with its own statistics
        assert torch.equal(before, after)


def test_a_resumed_fit_continues_with_the_same_algorithm_state(tmp_path: Path) -> None:
    def run(root: Path, ckpt: str | None = None) -> tuple[Classifier, L.Trainer]:
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=root, filename="{epoch}", save_top_k=-1)
        model = Classifier(gradual_invariance())
        fit = trainer(str(root), max_epochs=4, enable_checkpointing=True, callbacks=[checkpoints])
        fit.fit(model, *loaders(batch_size=8), ckpt_path=ckpt)
        return model, fit

    whole, _ = run(tmp_path / "whole")
    saved = torch.load(tmp_path / "whole" / "epoch=1.ckpt", weights_only=False)  # after epoch 2 of 4
    states = next(v for k, v in saved["callbacks"].items() if k.startswith("RegpipeCallback"))["algorithms"]
    assert states[0]["ops"][0]["step_count"] == 16  # the gradual schedule's position: 2 epochs x 8 steps

    resumed, fit = run(tmp_path / "resumed", ckpt=str(tmp_path / "whole" / "epoch=1.ckpt"))
    assert [s["t"] for s in resumed.seen] == [s["t"] for s in whole.seen[16:]]  # continues, not restarted
    assert fit.global_step == 32
    end, resumed_end = whole.regpipe.state_dict()["algorithms"], resumed.regpipe.state_dict()["algorithms"]
    assert end[0]["ops"][0]["step_count"] == resumed_end[0]["ops"][0]["step_count"] == 32
    for a, b in zip(end[:2], resumed_end[:2]):  # the ops' generators drew the same as the uninterrupted run's
        generator = (lambda s: s["ops"][0]["rng"]["generator"]) if "rng" in a["ops"][0] else \
            (lambda s: s["ops"][0]["augment"]["rng"]["generator"])
        assert torch.equal(generator(a), generator(b))
    for p, q in zip(whole.parameters(), resumed.parameters()):  # hence the same weights
        torch.testing.assert_close(p, q)


def test_a_checkpoint_of_another_recipe_or_without_regpipe_is_refused(tmp_path: Path) -> None:
    model = Classifier(RegpipeCallback("gradual", num_classes=4, gradual=GradualConfig(k0=2)))
    fit = trainer(str(tmp_path), max_epochs=1)
    fit.fit(model, *loaders(batch_size=8))
    fit.save_checkpoint(tmp_path / "gradual.ckpt")
    other = Classifier(RegpipeCallback("sum", num_classes=4))
    with pytest.raises(ValueError, match="holds no state of regpipe recipe 'sum'"):
        trainer(str(tmp_path), max_epochs=2).fit(other, *loaders(batch_size=8), ckpt_path=tmp_path / "gradual.ckpt")
    saved = torch.load(tmp_path / "gradual.ckpt", weights_only=False)
    key = next(k for k in saved["callbacks"] if k.startswith("RegpipeCallback"))
    with pytest.raises(ValueError, match="recipe 'gradual', this callback runs 'sum'"):
        RegpipeCallback("sum", num_classes=4).load_state_dict(saved["callbacks"][key])


@pytest.mark.parametrize(("recipe", "named"), [("loss-delta", "the optimizer step"),
                                               ("loss-order", "the order of batches"), ("sign", "the training set")])
def test_recipes_that_take_over_lightnings_loop_are_refused_when_built(recipe: str, named: str) -> None:
    with pytest.raises(ValueError, match=f"'{recipe}' takes over {named}"):
        RegpipeCallback(recipe, num_classes=4)


def test_bad_settings_are_named_before_any_work() -> None:
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['gradul'\]"):
        RegpipeCallback("gradual", num_classes=4, gradul=GradualConfig())
    with pytest.raises(ValueError, match="unknown recipe word"):
        RegpipeCallback("gradual+nope", num_classes=4)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        RegpipeCallback("gradual", num_classes=0)
    with pytest.raises(ValueError, match="std must be positive"):
        RegpipeCallback("gradual", num_classes=4, mean=[0.5], std=[0.0])
    with pytest.raises(ValueError, match="bn_batches must be an integer >= 0"):
        RegpipeCallback("gradual", num_classes=4, bn_batches=-1)
    assert install_hint("lightning.pytorch") == "pip install 'regpipe[lightning]'"  # the extra, when it is missing


def test_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TESTS / "lightning_ddp_probe.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 64 samples over 2 processes, 4 seeds per batch: 8 steps per epoch, 2 epochs; t advanced on both alike
    assert [r["global_step"] for r in ranks] == [16, 16] and [r["step_count"] for r in ranks] == [16, 16]
    assert all(rows == 8 for r in ranks for rows in r["rows"])  # 4 seeds x 2 copies on each process
    assert not set(ranks[0]["ids"]) & set(ranks[1]["ids"])  # each process trained on its own shard
    # each process draws its own op parameters; process 0 keeps the seed (one process draws what it always did)
    assert (ranks[0]["gradual_seed"], ranks[1]["gradual_seed"]) == (3, rank_seed(3, 1))
    assert (ranks[0]["augment_seed"], ranks[1]["augment_seed"]) == (3, rank_seed(3, 1))
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6)  # DDP kept the replicas equal
    assert all(math.isfinite(r["invariance"]) for r in ranks)

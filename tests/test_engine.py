"""The training engine: what each algorithm did inside the loop, composition, conflicts, cleanup.

Every run is 2 short epochs on the fake Fashion-MNIST (100 train images, 10 per class); the assertions
read the per-epoch log (rows per step, k or t, the loss terms) against the schedule each method defines.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from regpipe.engine.algorithms import ComposeError, build_algorithms, parse_recipe, reads_holdout
from regpipe.engine.config import (
    CascadeConfig,
    GradualConfig,
    InvarianceConfig,
    ReplicationConfig,
    SignConfig,
    SumConfig,
    TrainConfig,
)
from regpipe.engine.train import train

BATCH = 8
TRAIN_ROWS = 40  # 4 samples per class


def _run(fake_dir: Path, recipe: str, **changes: object) -> dict:
    cfg = TrainConfig(recipe=recipe, epochs=2, seed=3, samples_per_class=4, val_per_class=2, batch_size=BATCH,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64,
                      invariance=InvarianceConfig(layers=("layer1", "layer2")), sign=SignConfig(iters=(2, 3)))
    return train(replace(cfg, **changes))


def _finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_baseline_trains_whole_batches_with_no_algorithm(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "baseline")
    assert metrics["algorithms"] == []
    for row in metrics["epochs"]:
        assert row["rows_per_step"] == BATCH and row["steps"] == TRAIN_ROWS // BATCH
        assert not any(key.startswith("mean_") for key in row)


@pytest.mark.parametrize("mode, rows", [("group", BATCH // 2), ("permute", BATCH)])
def test_sum_mixes_k_rows_into_one(fake_dir: Path, mode: str, rows: int) -> None:
    metrics = _run(fake_dir, "sum", sum=SumConfig(k=2, mode=mode))
    assert [row["k"] for row in metrics["epochs"]] == [2, 2]
    assert all(row["rows_per_step"] == rows for row in metrics["epochs"])


def test_cascade_steps_down_its_stages(fake_dir: Path) -> None:
    # 2 epochs over stages (2, 1): one epoch each (the budget is shared), group mode halves the rows at k=2.
    metrics = _run(fake_dir, "cascade", cascade=CascadeConfig(stages=(2, 1), patience=5))
    assert [row["k"] for row in metrics["epochs"]] == [2, 1]
    assert [row["rows_per_step"] for row in metrics["epochs"]] == [BATCH // 2, BATCH]
    assert all("val_accuracy" in row for row in metrics["epochs"])


def test_cascade_stage_budgets_count_evaluations_with_eval_every(fake_dir: Path) -> None:
    # 12 epochs over stages (4, 2, 1), one evaluation every 2 epochs, a patience that never ends a stage:
    # each stage gets its share of the epochs (4), i.e. 2 evaluations, so the clean stage is reached.
    metrics = _run(fake_dir, "cascade", epochs=12, eval_every=2, cascade=CascadeConfig(stages=(4, 2, 1), patience=99))
    assert [row["k"] for row in metrics["epochs"]] == [4] * 4 + [2] * 4 + [1] * 4
    assert [row["epoch"] for row in metrics["epochs"] if "val_accuracy" in row] == [2, 4, 6, 8, 10, 12]


def test_gradual_advances_t_once_per_optimizer_step(fake_dir: Path) -> None:
    # fine_tune_frac=0.5 of 2 epochs: the gradual phase is 1 epoch of 5 steps, so t is 0 at the start of
    # epoch 1 and 5/5 = 1 at the start of epoch 2 (clean, whole batches).
    metrics = _run(fake_dir, "gradual", gradual=GradualConfig(k0=4, fine_tune_frac=0.5))
    assert [row["t"] for row in metrics["epochs"]] == [0.0, 1.0]
    assert [row["rows_per_step"] for row in metrics["epochs"]] == [BATCH // 4, BATCH]


@pytest.mark.parametrize("recipe", ["patchup-soft", "patchup-hard"])
def test_patchup_owns_the_forward_and_keeps_rows(fake_dir: Path, recipe: str) -> None:
    metrics = _run(fake_dir, recipe)
    assert metrics["algorithms"] == [recipe]
    for row in metrics["epochs"]:
        assert row["rows_per_step"] == BATCH and 0.0 < row["prob"] <= 1.0 and _finite(row["train_loss"])


def test_replication_keeps_equal_compute(fake_dir: Path) -> None:
    # BATCH / m seeds per step, m views each: as many rows per step and steps per epoch as the baseline.
    metrics = _run(fake_dir, "replicate", replication=ReplicationConfig(replicas=4))
    for row in metrics["epochs"]:
        assert row["m"] == 4 and row["rows_per_step"] == BATCH and row["steps"] == TRAIN_ROWS // BATCH


def test_invariance_and_saliency_add_their_terms(fake_dir: Path) -> None:
    inv = _run(fake_dir, "invariance")
    sal = _run(fake_dir, "saliency")
    both = _run(fake_dir, "invariance+saliency")
    assert inv["algorithms"] == ["replicate", "invariance"]
    assert both["algorithms"] == ["replicate", "invariance", "saliency"]  # replication once
    for row in inv["epochs"]:
        assert _finite(row["mean_invariance"]) and row["mean_invariance"] > 0 and _finite(row["mean_task"])
        assert "mean_saliency" not in row
    for row in sal["epochs"]:
        assert _finite(row["mean_saliency"]) and row["mean_saliency"] > 0 and "mean_invariance" not in row
    for row in both["epochs"]:
        assert _finite(row["mean_invariance"]) and _finite(row["mean_saliency"])
        # the logged loss is the objective: (1 - alpha) * task + invariance + saliency, per step averaged
        assert row["train_loss"] == pytest.approx(0.9 * row["mean_task"] + row["mean_invariance"]
                                                  + row["mean_saliency"], rel=1e-5)


def test_gradual_plus_invariance_logs_both_algorithms(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "gradual+invariance", gradual=GradualConfig(k0=2, fine_tune_frac=0.5))
    assert metrics["algorithms"] == ["gradual", "replicate", "invariance"]
    first, second = metrics["epochs"]
    # replicate (BATCH/4 seeds x 4 views), then the gradual mix halves the rows while t < 1
    assert (first["t"], first["m"], first["rows_per_step"]) == (0.0, 4, BATCH // 2)
    assert (second["t"], second["rows_per_step"]) == (1.0, BATCH)
    assert _finite(first["mean_invariance"]) and _finite(second["mean_invariance"])


def test_gradual_plus_invariance_mixes_whole_groups_and_the_term_moves(fake_dir: Path, tmp_path: Path) -> None:
    """With a consistency loss reading groups, the m copies of a seed mix with the same partner seeds and weights:
    every group of the mixed batch is m views of one mixture (Batch.replicas kept), and the invariance term,
    which compares a group's rows, trains (it stayed at its maximum, alpha = 0.1, when groups were guessed from
    the first component's seed id)."""
    from regpipe.engine.build import build_run
    from regpipe.engine.distributed import DistInfo

    changes = dict(batch_size=16, gradual=GradualConfig(k0=2, fine_tune_frac=0.25))  # 4 seeds x 4 views per batch
    cfg = TrainConfig(recipe="gradual+invariance", epochs=4, seed=3, samples_per_class=4, val_per_class=2,
                      data_dir=str(fake_dir), device="cpu", progress=False, eval_batch_size=64,
                      invariance=InvarianceConfig(layers=("layer1", "layer2")), **changes)
    algorithms = build_algorithms(cfg)
    run, _ = build_run(cfg, algorithms, torch.device("cpu"), DistInfo(), tmp_path, train)
    assert [getattr(a.op, "keep_groups", None) for a in algorithms if a.name == "gradual"] == [True]
    batch = next(iter(run.batches))
    seeds = batch.mixing.source_ids                                      # (8, 2): each row mixes 2 seeds
    assert batch.size == 8 and batch.replicas == 4 and all(len(set(row)) == 2 for row in seeds.tolist())
    groups = seeds.view(2, 4, 2)
    assert torch.equal(groups, groups[:, :1].expand_as(groups))         # a group: 4 views of one mixture
    assert not torch.equal(groups[0, 0].sort().values, groups[1, 0].sort().values)

    metrics = train(cfg)
    values = [row["mean_invariance"] for row in metrics["epochs"]]
    assert all(_finite(v) and v < 0.1 * 0.95 for v in values), values  # below alpha: groups vary less than the batch
    assert max(values) - min(values) > 1e-3, values


def test_sum_plus_saliency_compares_maps_of_mixed_rows(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "sum+saliency", sum=SumConfig(k=2))
    assert metrics["algorithms"] == ["sum", "replicate", "saliency"]
    for row in metrics["epochs"]:
        assert row["k"] == 2 and row["m"] == 4 and row["rows_per_step"] == BATCH // 2
        assert _finite(row["mean_saliency"]) and row["mean_saliency"] > 0


@pytest.fixture
def one_thread() -> object:
    """One intra-op thread: gradual+invariance sums rows in a thread-dependent order on several threads
    (runs of the same recipe then differ at ~1e-5), which is not what this test is about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_word_order_does_not_change_the_run(fake_dir: Path, one_thread: object) -> None:
    # k0=2: a batch holds BATCH/4 = 2 seeds, and mixing after replication pairs rows of different seeds
    a = _run(fake_dir, "gradual+invariance", gradual=GradualConfig(k0=2))
    b = _run(fake_dir, "invariance+gradual", gradual=GradualConfig(k0=2))
    assert [r["train_loss"] for r in a["epochs"]] == [r["train_loss"] for r in b["epochs"]]


@pytest.mark.parametrize("recipe", ["loss-delta", "loss-delta-external"])
def test_loss_delta_scores_every_step(fake_dir: Path, recipe: str) -> None:
    metrics = _run(fake_dir, recipe)
    for row in metrics["epochs"]:
        assert row["K"] == 4 and row["rows_per_step"] == BATCH and _finite(row["mean_score"])


def test_loss_order_hands_out_whole_batches(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "loss-order")
    assert all(row["order"] == "descending" and row["rows_per_step"] == BATCH for row in metrics["epochs"])


def test_sign_trains_on_the_samples_and_their_versions(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "sign")
    assert metrics["sign"]["train_rows"] == TRAIN_ROWS * 3  # originals + K=2 + K=3
    assert metrics["sign"]["teacher"] == "baseline" and 0.0 <= metrics["sign"]["teacher_test_accuracy"] <= 1.0
    assert all(row["steps"] == TRAIN_ROWS * 3 // BATCH for row in metrics["epochs"])


@pytest.mark.parametrize("recipe, names", [
    ("patchup-soft+saliency", ("patchup-soft", "saliency")),
    ("loss-delta+loss-order", ("loss-delta", "loss-order")),
    ("sum+gradual", ("sum", "gradual")),
    ("replicate+loss-order", ("replicate", "loss-order")),
    ("invariance+loss-delta", ("invariance", "loss-delta")),
])
def test_conflicting_algorithms_are_refused_naming_both(recipe: str, names: tuple[str, str]) -> None:
    with pytest.raises(ComposeError) as err:
        build_algorithms(TrainConfig(recipe=recipe))
    assert all(repr(name) in str(err.value) for name in names)


@pytest.mark.parametrize("recipe, fragment", [("bogus", "bogus"), ("sum+", "'+'-joined"), ("sum+sum", "more than once"),
                                              ("baseline+sum", "baseline")])
def test_bad_recipes_are_named(recipe: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_recipe(recipe)


def test_group_mixing_refuses_a_batch_size_it_would_not_read_whole(fake_dir: Path) -> None:
    with pytest.raises(ValueError, match="sum.k=3 does not divide batch_size=8"):
        _run(fake_dir, "sum", sum=SumConfig(k=3))


_CREATED: list[torch.nn.Module] = []


def exploding_model(num_classes: int, in_channels: int) -> torch.nn.Module:
    """A model whose second training forward pass returns NaN (to make a run fail inside the loop); forwards in
    eval mode (evaluation, an algorithm's check of its layers before training) are neither counted nor spoiled."""
    from regpipe.engine.models import preact_resnet_small

    model = preact_resnet_small(num_classes, in_channels)
    calls = {"n": 0}

    def poison(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        calls["n"] += 1
        return output * float("nan") if calls["n"] >= 2 else output

    model.linear.register_forward_hook(poison) if hasattr(model, "linear") else model.register_forward_hook(poison)
    _CREATED.append(model)
    return model


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("recipe", ["invariance", "patchup-soft"])
def test_a_failed_run_names_the_step_and_removes_its_hooks(fake_dir: Path, recipe: str) -> None:
    _CREATED.clear()
    with pytest.raises(ValueError, match=r"training loss became nan at epoch 1 step 2"):
        _run(fake_dir, recipe, model=f"{__name__}:exploding_model")
    (model,) = _CREATED
    assert _hook_count(model) == 1  # only the test's own poison hook is left


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_float32(fake_dir: Path, amp: str) -> None:
    full = _run(fake_dir, "baseline", epochs=1)
    low = _run(fake_dir, "baseline", epochs=1, amp=amp)
    assert low["config"]["amp"] == amp
    # autocast changes the rounding, not the run: the first epoch's loss agrees to a few percent
    assert low["epochs"][0]["train_loss"] == pytest.approx(full["epochs"][0]["train_loss"], rel=0.05)
    assert low["epochs"][0]["train_loss"] != full["epochs"][0]["train_loss"]


def test_loss_delta_takes_its_steps_through_the_loop_step_with_fp16_scaling(fake_dir: Path) -> None:
    full = _run(fake_dir, "loss-delta", epochs=1)
    low = _run(fake_dir, "loss-delta", epochs=1, amp="fp16")
    assert low["config"]["amp"] == "fp16"
    assert low["epochs"][0]["steps"] == full["epochs"][0]["steps"]
    # autocast and the scaled backward change the rounding, not the run
    assert low["epochs"][0]["train_loss"] == pytest.approx(full["epochs"][0]["train_loss"], rel=0.05)
    assert low["epochs"][0]["train_loss"] != full["epochs"][0]["train_loss"]


def test_precision_scales_fp16_losses_only() -> None:
    from regpipe.engine.precision import Precision

    assert not Precision("bf16", torch.device("cpu")).scaler.is_enabled()
    assert Precision("fp16", torch.device("cpu")).scaler.is_enabled()
    with torch.no_grad(), Precision("bf16", torch.device("cpu")).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="amp must be one of"):
        Precision("fp8", torch.device("cpu"))  # type: ignore[arg-type]


def test_run_settings_are_checked_when_built() -> None:
    from regpipe.engine.config_checks import check_config

    with pytest.raises(ValueError, match="train.eval_batch_size must be an integer >= 1, got 0"):
        TrainConfig(eval_batch_size=0)
    with pytest.raises(ValueError, match="train.checkpoint_every must be an integer >= 1, got -2"):
        TrainConfig(checkpoint_every=-2)
    with pytest.raises(ValueError, match="train.amp must be 'off', 'bf16' or 'fp16', got 'fp32'"):
        TrainConfig(amp="fp32")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train.resume needs train.out"):  # a cross-field check
        check_config(TrainConfig(resume=True))
    assert TrainConfig().eval_batch_size is None  # per process: the training batch's share


def _scripted_evaluate(monkeypatch: pytest.MonkeyPatch, val: list[float]) -> list[int]:
    """Replace the loop's ``evaluate``: each evaluation epoch calls it for the test set, then the validation
    set (which gets the next of ``val``); the final evaluation calls it once more. Returns the rows read."""
    import regpipe.engine.loop as loop
    import regpipe.engine.train as train_module

    calls: list[int] = []
    scripted = iter(val)

    def fake(model: torch.nn.Module, batches: object, tta: object = None, info: object = None) -> float:
        calls.append(sum(batch.size for batch in batches))
        return next(scripted) if len(calls) % 2 == 0 and len(calls) // 2 <= len(val) else 0.25

    monkeypatch.setattr(loop, "evaluate", fake)  # the epochs' evaluations
    monkeypatch.setattr(train_module, "evaluate", fake)  # the final one
    return calls


def test_plateau_lowers_the_lr_exactly_after_patience_stagnant_evaluations(
        fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # factor 0.5, patience 2: val 0.5 (best), 0.4 (1), 0.45 (2 -> x0.5), 0.6 (best), 0.6 (1): each row's lr is
    # the lr its epoch trained with, so the reduction after epoch 3 shows from epoch 4 on.
    _scripted_evaluate(monkeypatch, [0.5, 0.4, 0.45, 0.6, 0.6])
    metrics = _run(fake_dir, "baseline", epochs=5, lr=0.08, schedule="plateau", plateau_factor=0.5,
                   plateau_patience=2)
    assert [row["lr"] for row in metrics["epochs"]] == [0.08, 0.08, 0.08, 0.04, 0.04]
    assert [row["val_accuracy"] for row in metrics["epochs"]] == [0.5, 0.4, 0.45, 0.6, 0.6]


def test_cosine_is_unchanged_by_the_validation_metric(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "baseline", epochs=2, lr=0.08)
    steps = TRAIN_ROWS // BATCH
    expected = [0.08 * 0.5 * (1 + math.cos(math.pi * (e * steps) / (2 * steps))) for e in (1, 2)]
    assert [row["lr"] for row in metrics["epochs"]] == pytest.approx(expected)
    assert all("val_accuracy" not in row for row in metrics["epochs"])


def test_eval_every_evaluates_every_n_epochs_and_the_last(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "baseline", epochs=5, eval_every=2)
    assert [row["epoch"] for row in metrics["epochs"] if "test_accuracy" in row] == [2, 4, 5]
    assert _finite(metrics["test_accuracy"])


def test_eval_subset_reads_fewer_rows_until_the_final_evaluation(
        fake_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _scripted_evaluate(monkeypatch, [])
    _run(fake_dir, "baseline", epochs=2, eval_subset=7)
    assert calls == [7, 7, 30]  # two epoch evaluations of 7 test rows, the final one of all 30


def test_budgets_are_the_sums_of_the_epochs(fake_dir: Path) -> None:
    metrics = _run(fake_dir, "sum", epochs=3, sum=SumConfig(k=2, mode="group"), eval_every=3)
    rows = metrics["epochs"]
    assert metrics["optimizer_steps"] == sum(row["steps"] for row in rows) == 3 * (TRAIN_ROWS // BATCH)
    assert metrics["images_seen"] == sum(row["images"] for row in rows) == 3 * (TRAIN_ROWS // BATCH) * BATCH // 2


@pytest.mark.parametrize("changes, fragment", [
    ({"schedule": "step"}, "train.schedule must be 'cosine' or 'plateau', got 'step'"),
    ({"plateau_factor": 1.5}, r"factor must be a number in \(0, 1\), got 1.5"),
    ({"plateau_patience": 0}, "patience must be an integer >= 1, got 0"),
    ({"eval_every": 0}, "train.eval_every must be an integer >= 1, got 0"),
    ({"eval_subset": 0}, "train.eval_subset must be an integer >= 1, got 0"),
])
def test_schedule_and_evaluation_settings_are_checked(changes: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**changes)


@pytest.mark.parametrize("recipe, reads", [("baseline", False), ("gradual+invariance", False), ("loss-delta", False),
                                           ("cascade", True), ("loss-delta-external", True), ("cascade+invariance", True)])
def test_reads_holdout_names_the_recipes_that_read_the_validation_split(recipe: str, reads: bool) -> None:
    """The one predicate build_run (which carves the split) and check_config (which refuses it on .beton data)
    share: a decision from the validation accuracy (cascade), or loss-delta-external's trial rows."""
    assert reads_holdout(build_algorithms(TrainConfig(recipe=recipe))) is reads

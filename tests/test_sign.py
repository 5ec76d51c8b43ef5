"""SIGN (Asgari Taghanaki et al. 2019): the functional iteration against closed forms and a per-sample reference,
the feature function taken from a model (tap, buffers left untouched), the online op and its contract (replay,
state, reseed), checkpoints, offline generation (resume, ranks) and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regpipe import Batch
from regpipe.core import SignPlan
from regpipe.engine.checkpoint import load_checkpoint, save_checkpoint
from regpipe.cli import main
from regpipe.engine.data import load_dataset, stratified_indices
from regpipe.functional import sign
from regpipe.engine.models import preact_resnet_small
from regpipe.hooks.features import check_features, tapped_features
from regpipe.ops.sign import SignAugment
from regpipe.engine.sign_dataset import (
    generate,
    load_sign_output,
    pixel_bounds,
    transform_images,
)

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "1", "--no-progress"]


def _model(seed: int = 0, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(seed)
    return preact_resnet_small(num_classes=classes)


def _x(n: int = 4, seed: int = 1, shape: tuple[int, ...] = (3, 32, 32)) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the function


def test_linear_relu_matches_closed_form() -> None:
    # Phi(x) = relu(W x + b), units 0-1 always active and unit 2 never: delta = W[:2]^T 1 at every iterate.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    b = torch.tensor([1e3, 1e3, -1e3], dtype=torch.float64)
    p = torch.rand(6, 5, generator=g, dtype=torch.float64)
    eta = 0.3
    out = sign(lambda x: torch.relu(x @ w.T + b), p, iters=7, eta=eta)
    torch.testing.assert_close(out, p + 7 * eta * w[:2].sum(0), rtol=1e-12, atol=1e-12)


def test_linear_relu_matches_per_sample_reference() -> None:
    # Active sets change along the way: compare with an explicit per-sample loop, delta = W^T 1[Wp + b > 0].
    g = torch.Generator().manual_seed(3)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)
    b = torch.randn(8, generator=g, dtype=torch.float64)
    p = torch.randn(5, 5, generator=g, dtype=torch.float64)
    out = sign(lambda x: torch.relu(x @ w.T + b), p, iters=12, eta=0.05, snapshots=[4, 12])
    for i in range(p.shape[0]):
        q = p[i].clone()
        for k in range(1, 13):
            q = q + 0.05 * (w.T @ ((w @ q + b) > 0).to(w.dtype))
            if k in (4, 12):
                torch.testing.assert_close(out[k][i], q, rtol=1e-12, atol=1e-12)


def test_at_input_is_p_plus_k_eta_delta_of_p() -> None:
    model = _model().eval()
    p = _x()
    leaf = p.clone().requires_grad_(True)
    (delta,) = torch.autograd.grad(model.features(leaf).sum(), leaf)
    out = sign(model.features, p, iters=9, eta=0.5, at="input", snapshots=[3, 9])
    for k in (3, 9):
        torch.testing.assert_close(out[k], p + k * 0.5 * delta, rtol=1e-5, atol=1e-5)
    # "current" differs once the Jacobian changes with the iterate
    assert not torch.allclose(sign(model.features, p, iters=9, eta=0.5), out[9])


@pytest.mark.parametrize("layer", [None, "layer3"])
def test_snapshots_equal_separate_runs(layer: str | None) -> None:
    model = _model().eval()
    x = _x()
    with tapped_features(model, layer) as features:
        both = sign(features, x, iters=5, snapshots=[5, 2])
        assert list(both) == [2, 5]
        for k in (2, 5):
            torch.testing.assert_close(both[k], sign(features, x, iters=k), rtol=0, atol=0)


def test_tapped_layer_equals_callable_on_that_layer() -> None:
    model = _model().eval()
    x = _x()
    with tapped_features(model, "layer2") as phi:
        via_tap = sign(phi, x, iters=3)
    direct = sign(lambda v: model.layer2(model.layer1(model.conv1(v))), x, iters=3)
    torch.testing.assert_close(via_tap, direct, rtol=1e-6, atol=1e-6)
    with tapped_features(model) as phi:  # no layer: the model's features() method
        torch.testing.assert_close(sign(phi, x, iters=2), sign(model.features, x, iters=2), rtol=0, atol=0)


def test_sign_is_pure_and_tapped_features_restores_buffers() -> None:
    # sign() never touches a module: in training mode BatchNorm updates its running statistics through the
    # feature function; tapped_features writes them back on exit.
    model = _model().train()
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    sign(model.features, _x(), iters=2)
    assert any(not torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    model = _model().train()
    with tapped_features(model, keep_buffers=False) as phi:
        sign(phi, _x(), iters=2)
    assert any(not torch.equal(v, buffers[k]) for k, v in model.named_buffers())


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_weights_grads_buffers_and_mode_untouched(mode: str) -> None:
    model = _model()
    model.train(mode == "train")
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)  # an existing .grad must not change either
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    for layer in (None, "layer3"):
        with tapped_features(model, layer) as phi:
            sign(phi, _x(), iters=3)
    assert model.training == (mode == "train")
    assert all(m.training == (mode == "train") for m in model.modules())
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, params[k], rtol=0, atol=0)
        assert v.grad is None or k == "fc.weight"
    torch.testing.assert_close(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0))
    for k, v in model.named_buffers():
        torch.testing.assert_close(v, buffers[k], rtol=0, atol=0)
    assert not model._forward_hooks and not model.layer3._forward_hooks  # the tap is removed


def test_deterministic_and_works_under_no_grad() -> None:
    model = _model().eval()
    x = _x()
    first = sign(model.features, x, iters=4)
    with torch.no_grad():
        second = sign(model.features, x, iters=4)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not first.requires_grad and first.dtype == torch.float32 and first.shape == x.shape


def test_clamp_is_respected() -> None:
    model = _model().eval()
    x = _x().clamp(-1, 1)
    lo = torch.tensor([-1.0, -0.5, -0.2]).view(3, 1, 1)
    hi = torch.tensor([1.0, 0.5, 0.2]).view(3, 1, 1)
    x = torch.maximum(torch.minimum(x, hi), lo)
    for at in ("current", "input"):
        out = sign(model.features, x, iters=6, eta=20.0, at=at, clamp=(lo, hi))
        assert bool((out >= lo).all()) and bool((out <= hi).all())
        assert bool((out == hi).any()) or bool((out == lo).any())  # the bounds were reached
    unclamped = sign(model.features, x, iters=6, eta=20.0)
    assert bool((unclamped > hi).any() or (unclamped < lo).any())


def test_bad_inputs_are_named() -> None:
    model = _model().eval()
    x = _x()
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        sign(model.features, x, iters=0)
    with pytest.raises(ValueError, match="snapshot 101 is outside"):
        sign(model.features, x, iters=100, snapshots=[50, 101])
    with pytest.raises(TypeError, match="tapped_features"):  # the old (model, layer) pair: sign is pure now
        sign((model, "layer3"), x, iters=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="float32 or float64"):
        sign(model.features, x.to(torch.uint8), iters=1)
    with pytest.raises(ValueError, match="at must be"):
        sign(model.features, x, iters=1, at="output")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="clamp low must not exceed high"):
        sign(model.features, x, iters=1, clamp=(1.0, 0.0))
    with pytest.raises(ValueError, match="features must return"):
        sign(lambda v: v.sum(), x, iters=1)


def test_feature_function_errors_are_named() -> None:
    model = _model().eval()
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        check_features(model, "layer9")
    with pytest.raises(ValueError, match="no module named 'layer9'"):
        with tapped_features(model, "layer9"):
            pass
    with pytest.raises(ValueError, match="has no features\\(\\) method"):
        check_features(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        check_features(lambda v: v)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="boom"), tapped_features(model, "layer3"):
        raise RuntimeError("boom")
    assert not model.layer3._forward_hooks  # the hook is removed on an exception too


# --------------------------------------------------------------------------- the online op


def test_op_replaces_a_fraction_of_rows_with_their_transform() -> None:
    teacher = _model(classes=4)
    batch = Batch.from_labels(_x(9), torch.arange(9) % 4, num_classes=4)
    op = SignAugment(teacher, fraction=2 / 3, iters=(2, 5), seed=3)
    plan = op.draw(batch)
    assert isinstance(plan, SignPlan) and plan.iters == (2, 5)
    assert plan.counts == (3, 3) and plan.rows.unique().numel() == 6
    out = op(batch, plan)
    torch.testing.assert_close(out.targets, batch.targets)
    torch.testing.assert_close(out.source_ids, batch.source_ids)
    kept = torch.ones(9, dtype=torch.bool)
    kept[plan.rows] = False
    torch.testing.assert_close(out.inputs[kept], batch.inputs[kept], rtol=0, atol=0)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())  # the op froze its own copy
    frozen = teacher.eval()
    for rows, k in ((plan.rows[:3], 2), (plan.rows[3:], 5)):  # reference: the function on those rows alone
        torch.testing.assert_close(out.inputs[rows], sign(frozen.features, batch.inputs[rows], iters=k),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("at", ["current", "input"])
def test_op_replaying_a_plan_gives_identical_output(at: str) -> None:
    op = SignAugment(_model(classes=4), fraction=0.5, iters=(1, 3), at=at, layer="layer3" if at == "input" else None,
                     seed=7)
    batch = Batch.from_labels(_x(8), torch.arange(8) % 4, num_classes=4)
    plan = op.draw(batch)
    first = op.apply(batch, plan)
    state = op.rng.state_dict()["generator"].clone()
    again = op.apply(batch, plan)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(op(batch, plan).inputs, first.inputs)
    assert torch.equal(op.rng.state_dict()["generator"], state)  # apply draws nothing
    assert not torch.equal(first.inputs, batch.inputs)  # the plan did change rows
    assert torch.equal(batch.inputs, _x(8))  # the batch itself is not mutated


def test_op_state_dict_resumes_the_row_draw() -> None:
    op = SignAugment(_model(classes=4), fraction=0.5, iters=(1, 2), eta=0.5, at="input", seed=5)
    batch = Batch.from_labels(_x(10), torch.arange(10) % 4, num_classes=4)
    op.draw(batch)
    state = op.state_dict()
    assert {"rng", "fraction", "iters", "eta", "at"} <= set(state)
    expected = [op.draw(batch) for _ in range(3)]
    other = SignAugment(_model(classes=4), fraction=0.9, iters=(4,), seed=99)
    other.load_state_dict(state)
    assert (other.fraction, other.iters, other.eta, other.at) == (0.5, (1, 2), 0.5, "input")
    for e in expected:
        got = other.draw(batch)
        assert torch.equal(got.rows, e.rows) and got.counts == e.counts
    with pytest.raises(KeyError, match="rng"):
        other.load_state_dict({k: v for k, v in state.items() if k != "rng"})
    with pytest.raises(ValueError, match="fraction"):
        other.load_state_dict({**state, "fraction": 2.0})
    assert other.fraction == 0.5  # a rejected state changes nothing


def test_op_reseed_equals_a_fresh_op_and_ranks_differ() -> None:
    batch = Batch.from_labels(_x(12), torch.arange(12) % 4, num_classes=4)
    op = SignAugment(_model(classes=4), fraction=0.5, iters=(1,), seed=0)
    op.draw(batch)
    op.reseed(21, 0)
    fresh = SignAugment(_model(classes=4), fraction=0.5, iters=(1,), seed=21)
    assert all(torch.equal(op.draw(batch).rows, fresh.draw(batch).rows) for _ in range(3))
    op.reseed(21, 1)
    fresh = SignAugment(_model(classes=4), fraction=0.5, iters=(1,), seed=21)
    assert not all(torch.equal(op.draw(batch).rows, fresh.draw(batch).rows) for _ in range(3))


def test_sign_plan_checks_itself() -> None:
    rows = torch.tensor([3, 0, 5])
    assert SignPlan(rows=rows, iters=[2, 4], counts=[2, 1]).iters == (2, 4)  # stored as tuples
    with pytest.raises(ValueError, match="1-D int64"):
        SignPlan(rows=rows.int(), iters=(2,), counts=(3,))
    with pytest.raises(ValueError, match="ascending"):
        SignPlan(rows=rows, iters=(4, 2), counts=(2, 1))
    with pytest.raises(ValueError, match="sum to 2"):
        SignPlan(rows=rows, iters=(2, 4), counts=(1, 1))
    plan = SignPlan(rows=rows, iters=(2,), counts=(3,))
    batch = Batch.from_labels(_x(4), torch.arange(4), num_classes=4)
    with pytest.raises(ValueError, match="the batch has 4 rows"):
        SignAugment(_model(classes=4), iters=(2,)).apply(batch, plan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.iters = (3,)  # type: ignore[misc]


def test_op_edge_cases() -> None:
    batch = Batch.from_labels(_x(4), torch.arange(4), num_classes=4)
    assert SignAugment(_model(classes=4), fraction=0.0, iters=(2,))(batch) is batch
    with pytest.raises(ValueError, match="fraction"):
        SignAugment(_model(classes=4), fraction=1.5)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        SignAugment(_model(classes=4), layer="nope")
    with pytest.raises(ValueError, match="iters must be >= 1"):
        SignAugment(_model(classes=4), iters=(0, 2))
    with pytest.raises(TypeError, match="normalised float inputs"):
        SignAugment(_model(classes=4), iters=(1,))(batch.replace(inputs=torch.zeros(4, 3, 32, 32, dtype=torch.uint8)))
    with pytest.raises(TypeError, match="SignPlan"):
        SignAugment(_model(classes=4), iters=(1,)).apply(batch, {"rows": torch.arange(2)})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- checkpoints and offline generation



@pytest.fixture(scope="module")
def checkpoint(fake_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base")
    assert main(["train", "--recipe", "baseline", "--data-dir", str(fake_dir), "--out", str(out),
                 "--checkpoint-out", str(out / "model.pt"), *TINY]) == 0
    return out / "model.pt"


def test_train_checkpoint_round_trip(checkpoint: Path) -> None:
    ckpt = load_checkpoint(checkpoint)
    assert (ckpt.model_name, ckpt.num_classes, ckpt.in_channels, ckpt.image_shape) == ("preact-small", 10, 3, (3, 32, 32))
    assert ckpt.config["recipe"] == "baseline" and len(ckpt.mean) == 3 and not ckpt.model.training


def test_checkpoint_for_another_architecture_is_named(checkpoint: Path, tmp_path: Path, fake_dir: Path, capsys) -> None:
    with pytest.raises(ValueError, match="trained with model 'preact-small', but model 'preact-resnet18'"):
        load_checkpoint(checkpoint, model_name="preact-resnet18")
    with pytest.raises(ValueError, match="in channels 3, but in channels 1"):
        load_checkpoint(checkpoint, in_channels=1)
    # a checkpoint whose weights do not fit the architecture it names
    payload = torch.load(checkpoint, weights_only=True)
    payload["model"] = "preact-resnet18"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not fit the PreActResNet.*(missing keys|shape mismatches)"):
        load_checkpoint(tmp_path / "bad.pt")
    assert main(["sign", "--checkpoint", str(checkpoint), "--model", "preact-resnet18", "--data-dir", str(fake_dir),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "preact-resnet18" in capsys.readouterr().err
    # data of another shape than the model was trained on
    assert main(["sign", "--checkpoint", str(checkpoint), "--shape", "native", "--data-dir", str(fake_dir),
                 "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "(1, 28, 28)" in capsys.readouterr().err


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".npz", ".json")}


SETTINGS = {"iters": (2, 3), "samples_per_class": 3, "shard_size": 8, "batch_size": 5, "progress": False}


def test_offline_generation_shapes_labels_indices(checkpoint: Path, fake_dir: Path, tmp_path: Path) -> None:
    report = generate(checkpoint, tmp_path / "a", data_dir=str(fake_dir), **SETTINGS)
    assert report["num_shards"] == 4 and len(report["written"]) == 4  # 30 samples, shards of 8
    result = load_sign_output(tmp_path / "a")
    arrays = load_dataset("fashion-mnist", "train", data_dir=str(fake_dir), shape="cifar")
    expected_idx = stratified_indices(arrays.labels, 3, seed=0)
    assert torch.equal(result.indices, expected_idx) and torch.equal(result.labels, arrays.labels[expected_idx])
    assert set(result.images) == {2, 3} and result.images[3].shape == (30, 3, 32, 32)
    ckpt = load_checkpoint(checkpoint)
    reference = transform_images(ckpt.model, arrays.images[expected_idx], ckpt.mean, ckpt.std, (2, 3))
    for k in (2, 3):  # float16 storage of the 0..1-scale iterate
        torch.testing.assert_close(result.images[k], reference[k], rtol=2e-3, atol=2e-3)
    assert result.manifest["storage"].startswith("pixel scale") and result.manifest["dtype"] == "float16"


def test_resume_after_interruption_gives_the_same_files(checkpoint: Path, fake_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    generate(checkpoint, tmp_path / "whole", data_dir=str(fake_dir), **SETTINGS)
    import regpipe.engine.sign_dataset as offline

    real_write, calls = offline.write_npz, []

    def interrupted(path: Path, arrays: dict) -> Path:
        calls.append(path.name)
        if len(calls) == 3:  # die half-way through the third shard: a partial temporary is left behind
            path.with_name(f"{path.name}.tmp-12345").write_bytes(b"PK\x03\x04 partial")
            raise KeyboardInterrupt
        return real_write(path, arrays)

    monkeypatch.setattr(offline, "write_npz", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(checkpoint, tmp_path / "resumed", data_dir=str(fake_dir), **SETTINGS)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz"]
    with pytest.raises(FileNotFoundError, match="unfinished"):
        load_sign_output(tmp_path / "resumed")
    monkeypatch.setattr(offline, "write_npz", real_write)
    report = generate(checkpoint, tmp_path / "resumed", data_dir=str(fake_dir), **SETTINGS)
    assert report["skipped"] == ["shard-00000.npz", "shard-00001.npz"] and len(report["written"]) == 2
    assert not list((tmp_path / "resumed").glob("*.tmp-*"))
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")  # byte for byte
    with pytest.raises(ValueError, match="other settings.*eta"):
        generate(checkpoint, tmp_path / "resumed", data_dir=str(fake_dir), eta=0.5, **SETTINGS)


def test_ranks_split_the_shards(checkpoint: Path, fake_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generate(checkpoint, tmp_path / "one", data_dir=str(fake_dir), **SETTINGS)
    written = []
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        written.append(generate(checkpoint, tmp_path / "two", data_dir=str(fake_dir), **SETTINGS)["written"])
    assert written == [["shard-00001.npz", "shard-00003.npz"], ["shard-00000.npz", "shard-00002.npz"]]
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_clamped_generation_stays_in_pixel_range(checkpoint: Path, fake_dir: Path, tmp_path: Path) -> None:
    generate(checkpoint, tmp_path / "c", data_dir=str(fake_dir), clamp=True, eta=50.0, dtype="float32",
             **SETTINGS)
    images = load_sign_output(tmp_path / "c").images[3]
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    lo, hi = pixel_bounds((0.5,), (0.25,))
    assert (float(lo), float(hi)) == (-2.0, 2.0)


# --------------------------------------------------------------------------- the CLI


def test_cli_sign_writes_shards_and_resumes(checkpoint: Path, fake_dir: Path, tmp_path: Path, capsys) -> None:
    args = ["sign", "--checkpoint", str(checkpoint), "--data-dir", str(fake_dir), "--iters", "1,2",
            "--samples-per-class", "2", "--shard-size", "16", "--out", str(tmp_path / "s"), "--no-progress"]
    assert main(args) == 0
    assert "wrote 2 shard(s), skipped 0" in capsys.readouterr().out
    assert main(args) == 0
    assert "wrote 0 shard(s), skipped 2" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["iters"] == [1, 2] and manifest["num_samples"] == 20
    assert main([*args[:-3], "--iters", "0,2", "--out", str(tmp_path / "t"), "--no-progress"]) == 2
    assert "snapshot 0 is outside" in capsys.readouterr().err


def test_sign_recipe_end_to_end_in_compare(fake_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    assert main(["compare", "--recipes", "baseline,sign", "--seeds", "1", "--sign-iters", "2,3",
                 "--data-dir", str(fake_dir), "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [r["recipe"] for r in summary] == ["baseline", "sign"]
    base = json.loads((out / "baseline" / "seed0" / "metrics.json").read_text())
    metrics = json.loads((out / "sign" / "seed0" / "metrics.json").read_text())
    info = metrics["sign"]
    assert info["iters"] == [2, 3] and info["train_rows"] == 3 * 40 and metrics["train_samples"] == 40
    # the teacher is the baseline run itself: same settings and seed, deterministic
    assert info["teacher_test_accuracy"] == base["test_accuracy"]
    assert (out / "sign" / "seed0" / "teacher.pt").exists()
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["epochs"]


def test_sign_recipe_with_a_given_teacher(checkpoint: Path, fake_dir: Path, tmp_path: Path) -> None:
    assert main(["train", "--recipe", "sign", "--sign-teacher", str(checkpoint), "--sign-iters", "1",
                 "--data-dir", str(fake_dir), "--out", str(tmp_path / "r"), *TINY]) == 0
    info = json.loads((tmp_path / "r" / "metrics.json").read_text())["sign"]
    assert info["teacher"] == str(checkpoint) and info["train_rows"] == 80


def test_show_sign_draws_png(fake_dir: Path, checkpoint: Path, tmp_path: Path) -> None:
    for extra in ([], ["--checkpoint", str(checkpoint)]):
        png = tmp_path / f"sign{len(extra)}.png"
        assert main(["show", "sign", "--data-dir", str(fake_dir), "--out", str(png), *extra]) == 0
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_checkpoint_checks_its_metadata(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_shape must be"):
        save_checkpoint(tmp_path / "m.pt", _model(), "preact-small", 10, (32, 32), (0.5,), (0.5,))
    with pytest.raises(ValueError, match="1/1 values for 3 channels"):
        save_checkpoint(tmp_path / "m.pt", _model(), "preact-small", 10, (3, 32, 32), (0.5,), (0.5,))
    np.testing.assert_equal(list(tmp_path.iterdir()), [])


def test_feature_function_module_examples_run() -> None:
    import doctest

    import regpipe.hooks.features as features

    result = doctest.testmod(features, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0

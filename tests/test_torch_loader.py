"""Tests for regpipe.loaders.torch (TorchLoader, normalize)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from regpipe import Batch
from regpipe.loaders.torch import TorchLoader, normalize

N, C, S, K = 10, 3, 4, 5
MEAN, STD = [0.2, 0.5, 0.7], [0.25, 0.5, 0.125]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (N, C, S, S), dtype=torch.uint8, generator=g)
    images[0, :, 0, 0] = 0
    images[1, :, 0, 0] = 255  # both ends of the range
    labels = torch.randint(0, K, (N,), generator=g)
    labels[:K] = torch.arange(K)  # every class appears
    ids = torch.randperm(1000, generator=g)[:N]
    return {"images": images, "labels": labels, "ids": ids}


def manual_normalize(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    out = torch.empty(images.shape, dtype=torch.float32)
    for n in range(images.shape[0]):
        for c in range(images.shape[1]):
            out[n, c] = (images[n, c].double() / 255.0 - mean[c]) / std[c]
    return out


def one_hot(labels: torch.Tensor, k: int = K) -> torch.Tensor:
    out = torch.zeros(labels.shape[0], k)
    for i, y in enumerate(labels.tolist()):
        out[i, y] = 1.0
    return out


# ------------------------------------------------------------------ batches
def test_two_tuples_normalised_one_hot_running_positions(data) -> None:
    dl = DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=4)
    loader = TorchLoader(dl, num_classes=K, mean=MEAN, std=STD)
    assert len(loader) == 3
    batches = list(loader)
    assert [b.size for b in batches] == [4, 4, 2]
    assert all(isinstance(b, Batch) for b in batches)
    inputs = torch.cat([b.inputs for b in batches])
    assert inputs.dtype == torch.float32
    torch.testing.assert_close(inputs, manual_normalize(data["images"]))
    targets = torch.cat([b.targets for b in batches])
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets, one_hot(data["labels"]), rtol=0, atol=0)
    assert [b.source_ids.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert all(b.source_ids.dtype == torch.int64 for b in batches)
    # A second pass restarts the positions and gives the same batches.
    again = list(loader)
    assert [b.source_ids.tolist() for b in again] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    torch.testing.assert_close(torch.cat([b.inputs for b in again]), inputs, rtol=0, atol=0)


def test_three_tuples_use_yielded_indices(data) -> None:
    dataset = TensorDataset(data["images"], data["labels"], data["ids"])
    dl = DataLoader(dataset, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(7))
    batches = list(TorchLoader(dl, num_classes=K, mean=MEAN, std=STD))
    assert [b.size for b in batches] == [3, 3, 3, 1]
    ids = torch.cat([b.source_ids for b in batches])
    assert sorted(ids.tolist()) == sorted(data["ids"].tolist())
    # Every row is the dataset row its id names.
    position = {int(v): i for i, v in enumerate(data["ids"])}
    rows = torch.tensor([position[int(v)] for v in ids])
    assert not torch.equal(rows, torch.arange(N))  # shuffled
    torch.testing.assert_close(torch.cat([b.inputs for b in batches]), manual_normalize(data["images"][rows]))
    torch.testing.assert_close(torch.cat([b.targets for b in batches]), one_hot(data["labels"][rows]),
                               rtol=0, atol=0)


def test_no_mean_std_converts_uint8_to_unit_range(data) -> None:
    dl = DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=5)
    inputs = torch.cat([b.inputs for b in TorchLoader(dl, num_classes=K)])
    assert inputs.dtype == torch.float32
    torch.testing.assert_close(inputs, manual_normalize(data["images"], [0.0] * C, [1.0] * C))
    assert float(inputs.min()) == 0.0 and float(inputs.max()) == 1.0


def test_float_images_without_mean_pass_through(data) -> None:
    floats = torch.rand(N, C, S, S, generator=torch.Generator().manual_seed(3))
    dl = DataLoader(TensorDataset(floats, data["labels"]), batch_size=4)
    inputs = torch.cat([b.inputs for b in TorchLoader(dl, num_classes=K)])
    torch.testing.assert_close(inputs, floats, rtol=0, atol=0)


def test_float_images_with_mean_are_not_divided_by_255(data) -> None:
    floats = torch.rand(N, C, S, S, generator=torch.Generator().manual_seed(3))
    dl = DataLoader(TensorDataset(floats, data["labels"]), batch_size=4)
    inputs = torch.cat([b.inputs for b in TorchLoader(dl, num_classes=K, mean=MEAN, std=STD)])
    torch.testing.assert_close(inputs, manual_normalize(floats * 255.0))


def test_ops_applied_in_order(data) -> None:
    calls: list[tuple[str, int]] = []
    seen: list[torch.Tensor] = []

    def record(name, fn):
        def op(batch: Batch) -> Batch:
            calls.append((name, batch.size))
            if name == "double":
                seen.append(batch.inputs.clone())
            return batch.replace(inputs=fn(batch.inputs))
        return op

    ops = [record("double", lambda x: x * 2), record("plus_one", lambda x: x + 1)]
    dl = DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=4)
    batches = list(TorchLoader(dl, num_classes=K, ops=ops, mean=MEAN, std=STD))
    assert calls == [("double", 4), ("plus_one", 4), ("double", 4), ("plus_one", 4),
                     ("double", 2), ("plus_one", 2)]
    expected = manual_normalize(data["images"])
    torch.testing.assert_close(torch.cat(seen), expected)  # ops see the normalised batch
    torch.testing.assert_close(torch.cat([b.inputs for b in batches]), expected * 2 + 1)  # not (x + 1) * 2


def test_ops_that_change_the_size_do_not_shift_positions(data) -> None:
    drop_half = lambda b: Batch(inputs=b.inputs[::2], targets=b.targets[::2], source_ids=b.source_ids[::2])  # noqa: E731
    dl = DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=4)
    batches = list(TorchLoader(dl, num_classes=K, ops=[drop_half]))
    assert [b.source_ids.tolist() for b in batches] == [[0, 2], [4, 6], [8]]


@pytest.mark.parametrize("mean, std", [(MEAN, STD), (None, None)])
def test_channels_last_kept(data, mean, std) -> None:
    dl = DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=4)
    plain = list(TorchLoader(dl, num_classes=K, mean=mean, std=std))
    cl = list(TorchLoader(dl, num_classes=K, mean=mean, std=std, channels_last=True))
    for a, b in zip(plain, cl):
        assert b.inputs.is_contiguous(memory_format=torch.channels_last)
        assert not a.inputs.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(b.inputs, a.inputs, rtol=0, atol=0)


def test_keep_uint8(data) -> None:
    dl = DataLoader(TensorDataset(data["images"], data["labels"]), batch_size=4)
    raw = list(TorchLoader(dl, num_classes=K, keep_uint8=True, channels_last=True))  # no mean/std: raw pixels
    assert all(b.inputs.dtype == torch.uint8 for b in raw)
    assert all(b.inputs.is_contiguous(memory_format=torch.channels_last) for b in raw)
    assert torch.equal(torch.cat([b.inputs for b in raw]), data["images"])
    torch.testing.assert_close(torch.cat([b.targets for b in raw]), one_hot(data["labels"]))
    # with mean/std the uint8 ops run first, and the batch is still normalised at the end (never ignored)
    seen = []
    flip = lambda b: (seen.append(b.inputs.dtype), b.replace(inputs=b.inputs.flip(-1)))[1]  # noqa: E731
    batches = list(TorchLoader(dl, num_classes=K, mean=MEAN, std=STD, keep_uint8=True, ops=[flip]))
    assert seen == [torch.uint8] * 3
    torch.testing.assert_close(torch.cat([b.inputs for b in batches]), manual_normalize(data["images"]).flip(-1))


def test_plain_iterable_of_lists_and_tuples(data) -> None:
    items = [(data["images"][:4], data["labels"][:4].tolist()), [data["images"][4:], data["labels"][4:]]]
    batches = list(TorchLoader(items, num_classes=K))
    assert [b.source_ids.tolist() for b in batches] == [[0, 1, 2, 3], list(range(4, N))]
    torch.testing.assert_close(torch.cat([b.targets for b in batches]), one_hot(data["labels"]))


# ------------------------------------------------------------------ normalize
def test_normalize_uint8_and_channels_last(data) -> None:
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    out = normalize(data["images"], mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, manual_normalize(data["images"]))
    cl = data["images"].contiguous(memory_format=torch.channels_last)
    out_cl = normalize(cl, mean, std)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, rtol=0, atol=0)
    out64 = normalize(data["images"], mean, std, dtype=torch.float64)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), out)
    with pytest.raises(ValueError, match=re.escape("2/2 values for 3 channels")):
        normalize(data["images"], mean[:2], std[:2])


def test_normalize_does_not_modify_float_input() -> None:
    x = torch.rand(2, C, S, S, generator=torch.Generator().manual_seed(0))
    x0 = x.clone()
    out = normalize(x, torch.tensor(MEAN), torch.tensor(STD))
    torch.testing.assert_close(out, (x0 - torch.tensor(MEAN).view(1, C, 1, 1)) / torch.tensor(STD).view(1, C, 1, 1))
    torch.testing.assert_close(x, x0, rtol=0, atol=0)


def test_float_iterable_reused_over_two_passes(data) -> None:
    floats = torch.rand(4, C, S, S, generator=torch.Generator().manual_seed(3))
    items = [(floats, data["labels"][:4])]
    loader = TorchLoader(items, num_classes=K, mean=MEAN, std=STD)
    first = next(iter(loader)).inputs.clone()
    second = next(iter(loader)).inputs
    torch.testing.assert_close(second, first, rtol=0, atol=0)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("bad", [7, -1, K])
def test_label_out_of_range_names_the_label(data, bad: int) -> None:
    labels = data["labels"].clone()
    labels[6] = bad
    dl = DataLoader(TensorDataset(data["images"], labels), batch_size=4)
    iterator = iter(TorchLoader(dl, num_classes=K))
    next(iterator)  # the first batch is fine
    with pytest.raises(ValueError, match=rf"label {bad} is out of range for num_classes={K}"):
        next(iterator)


def test_labels_of_wrong_shape(data) -> None:
    loader = TorchLoader([], num_classes=K)
    with pytest.raises(ValueError, match=re.escape("labels must be (N,) = (4,), got (4, 1)")):
        loader.to_batch((data["images"][:4], data["labels"][:4].view(4, 1)))
    with pytest.raises(ValueError, match=re.escape("got (3,)")):
        loader.to_batch((data["images"][:4], data["labels"][:3]))
    dl = DataLoader(TensorDataset(data["images"], data["labels"].view(N, 1)), batch_size=4)
    with pytest.raises(ValueError, match=re.escape("got (4, 1)")):
        next(iter(TorchLoader(dl, num_classes=K)))
    with pytest.raises(TypeError, match="float32"):
        loader.to_batch((data["images"][:4], data["labels"][:4].float()))


def test_items_that_are_not_two_or_three_tuples(data) -> None:
    images, labels, ids = data["images"][:4], data["labels"][:4], data["ids"][:4]
    loader = TorchLoader([], num_classes=K)
    with pytest.raises(ValueError, match="tuple of length 4"):
        loader.to_batch((images, labels, ids, ids))
    with pytest.raises(ValueError, match="list of length 1"):
        loader.to_batch([images])
    with pytest.raises(ValueError, match="Tensor of length 4"):
        loader.to_batch(images)
    with pytest.raises(ValueError, match="dict"):
        loader.to_batch({"images": images, "labels": labels})
    dl = DataLoader(TensorDataset(images, labels, ids, ids), batch_size=2)
    with pytest.raises(ValueError, match="length 4"):
        list(TorchLoader(dl, num_classes=K))


def test_bad_images_and_indices(data) -> None:
    loader = TorchLoader([], num_classes=K)
    with pytest.raises(ValueError, match=re.escape("got (4, 4, 4)")):
        loader.to_batch((data["images"][:4, 0], data["labels"][:4]))
    with pytest.raises(ValueError, match="got list"):
        loader.to_batch(([1, 2], data["labels"][:2]))
    with pytest.raises(ValueError, match=re.escape("indices must be (N,) = (4,), got (3,)")):
        loader.to_batch((data["images"][:4], data["labels"][:4], data["ids"][:3]))


def test_mean_without_std_and_std_without_mean() -> None:
    with pytest.raises(ValueError, match="both mean and std"):
        TorchLoader([], num_classes=K, mean=MEAN)
    with pytest.raises(ValueError, match="both mean and std"):
        TorchLoader([], num_classes=K, std=STD)


@pytest.mark.parametrize("std", [[0.5, 0.0, 0.5], [0.5, 0.5, -0.25]])
def test_non_positive_std(std) -> None:
    with pytest.raises(ValueError, match=re.escape(f"std must be positive, got {std}")):
        TorchLoader([], num_classes=K, mean=MEAN, std=std)


# ------------------------------------------------------------------ layers
def test_loaders_import_nothing_from_the_engine() -> None:
    # The loaders sit below the engine: no module of regpipe.loaders may import regpipe.engine (even in a function).
    root = Path(__file__).resolve().parents[1] / "loaders"
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("regpipe.engine", "regpipe.cli")) for n in names), (path.name, names)


@pytest.mark.parametrize("executor", ["auto", "torch"])
def test_kernel_log_names_the_dtype_the_torch_mix_writes(data, executor: str, monkeypatch, capsys) -> None:
    from regpipe.loaders.common import LOG_ENV, BatchBuilder
    from regpipe.ops import SumMix

    monkeypatch.setenv(LOG_ENV, "1")
    builder = BatchBuilder(K, ops=[SumMix(groups=2)], executor=executor)  # float64: no kernel writes it
    out = builder.apply(builder.build(data["images"].double() / 255.0, data["labels"]))
    assert out.inputs.dtype == torch.float64 and builder.ran == {"mix_rows[torch]": 1}
    assert "SumMix: mix_rows[torch] float64 -> float64" in capsys.readouterr().err

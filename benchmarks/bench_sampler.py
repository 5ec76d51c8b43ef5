"""Loss-delta orderer cost per committed step, measured side by side in one run (issue 6).

Rows (median ms per committed step over repeats; ``ratio`` relative to the plain step), on
``preact_resnet_small``, batch 64 x 3 x 32 x 32, SGD (momentum 0.9, Nesterov, weight decay):
  * the plain step (``zero_grad``, forward, backward, ``step``);
  * :class:`~regpipe.sampler.LossDeltaOrderer` at K = 4 and 8 (same-batch variant, exact commit from
    preallocated snapshots), and its first-order ``approximate=True`` mode;
  * the naive implementation (``copy.deepcopy`` of model and optimizer per candidate, the winner's
    step recomputed) at K = 4 and 8 -- ``tests/test_sampler.py::naive_loss_delta_step``, the tests'
    reference, as the thesis's proof of concept did it.

The cases are interleaved round-robin so machine noise hits all alike. Each orderer step scores a full
buffer of K candidates (the batch stream cycles over K+1 fixed batches).

Usage: ``python benchmarks/bench_sampler.py [--device cpu|cuda|all] [--json FILE] [--repeats R]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from common import median_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # one reference: the tests' naive version

from regpipe.core.batch import Batch  # noqa: E402
from regpipe.functional.losses import soft_target_cross_entropy  # noqa: E402
from regpipe.engine.models import preact_resnet_small  # noqa: E402
from regpipe.sampler import LossDeltaOrderer  # noqa: E402
from tests.test_sampler import naive_loss_delta_step, plain_step  # noqa: E402


def make_state(device: torch.device) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = preact_resnet_small().to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, opt


def make_batches(n: int, device: torch.device, batch_size: int = 64) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch.from_labels(torch.randn(batch_size, 3, 32, 32, generator=g).to(device),
                              torch.randint(0, 10, (batch_size,), generator=g), 10,
                              torch.arange(i * batch_size, (i + 1) * batch_size)).to(device) for i in range(n)]


def rows_for(device: torch.device, repeats: int) -> list[dict]:
    loss = soft_target_cross_entropy
    batches = make_batches(9, device)
    cases: dict[str, Callable[[], object]] = {}
    model, opt = make_state(device)
    cycle = itertools.cycle(batches[:1])
    cases["plain step"] = lambda m=model, o=opt, c=cycle: plain_step(m, o, loss, next(c))
    for k in (4, 8):
        for approximate in (False, True):
            model, opt = make_state(device)
            orderer = LossDeltaOrderer(itertools.cycle(batches[:k + 1]), model, loss, opt, k=k,
                                       approximate=approximate)
            name = f"orderer K={k}" + (" approximate" if approximate else "")
            cases[name] = lambda it=iter(orderer): next(it)
    for k in (4, 8):
        model, opt = make_state(device)
        cases[f"naive deepcopy K={k}"] = lambda m=model, o=opt, k=k: naive_loss_delta_step(m, o, loss, batches[:k])
    medians = median_ms(cases, device, repeats)
    base = medians["plain step"]
    return [{"name": name, "provider": "torch", "model": "preact_resnet_small", "shape": [64, 3, 32, 32],
             "dtype": "float32", "device": str(device), "median_ms": ms, "ratio": ms / base,
             "baseline": "plain step", "threads": torch.get_num_threads()} for name, ms in medians.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices:
        rows += rows_for(device, args.repeats)
    print(f"{'case':28s} {'device':6s} {'median ms':>10s} {'x plain':>8s}")
    for row in rows:
        print(f"{row['name']:28s} {row['device']:6s} {row['median_ms']:10.1f} {row['ratio']:8.2f}")
    if args.json is not None:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

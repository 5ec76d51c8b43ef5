"""The README's Python blocks and the docstring examples run, so the docs cannot rot."""

from __future__ import annotations

import doctest
import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
MODULES = ["regpipe.core.batch", "regpipe.engine.cascade", "regpipe.ops.sum_mix", "regpipe.ops.tta", "regpipe.loaders.torch",
           "regpipe.functional.patchup", "regpipe.ops.patchup", "regpipe.hooks.patchup",
           "regpipe.hooks.tap", "regpipe.ops.augment", "regpipe.functional.invariance", "regpipe.functional.saliency",
           "regpipe.hooks.invariance", "regpipe.hooks.saliency",
           "regpipe.functional.sign", "regpipe.ops.sign", "regpipe.hooks.features", "regpipe.engine.checkpoint"]


def test_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, capsys) -> None:
    exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
    if name != "regpipe.core.batch":
        assert result.attempted > 0, f"{name} has no examples"

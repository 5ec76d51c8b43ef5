"""The command lines of ``regpipe train`` and ``regpipe compare``, generated from the config dataclasses.

Every field of :class:`~regpipe.engine.config.TrainConfig` and of its per-algorithm dataclasses is a flag,
made by `tyro <https://brentyi.github.io/tyro/>`_: ``--batch-size``, ``--sum.k``, ``--loss-delta.external-rows``
(a nested dataclass's fields under its name), booleans as ``--resume`` / ``--no-resume``, lists as ``4,2,1``
or ``4 2 1``; the help text is each class's ``Attributes:`` entry, and the flags the CLI had before it was
generated (``--k0``, ``--inv-alpha``, ``--data``...) are aliases declared on the fields. A command adds its
own options as one more dataclass, flattened into the same command line (:class:`NoOptions` for ``train``,
``CompareOptions`` in :mod:`regpipe.cli.compare`): :class:`Command` holds both.

``--config FILE.yaml`` reads settings from a YAML file with the fields' names as keys (what
``--print-config`` prints and every run writes to ``OUT/config.yaml``); flags override the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Annotated, Any, Generic, Literal, TypeVar

import tyro
# tyro's own rule for dataclasses (not re-exported by tyro.constructors): the config dataclasses are built by
# it, with only the constructor wrapped (see _refusals_reraised).
from tyro.constructors._struct_spec_dataclass import dataclass_rule

from regpipe.engine.config import RESOLVED_FIELDS, TrainConfig, config_from_dict, config_yaml, load_yaml

__all__ = ["Command", "NoOptions", "as_default", "parse_command"]

Options = TypeVar("Options")

@dataclass(frozen=True)
class NoOptions:
    """A command without options of its own (``regpipe train``)."""


@dataclass(frozen=True)
class Command(Generic[Options]):
    """A command line: the run's settings, the command's own options, and how the settings are given.

    Attributes:
        settings: the run's settings, flags without a prefix (--batch-size, --sum.k).
        options: the command's own options, flags without a prefix.
        config: a YAML file of settings, keys as --print-config prints them (e.g. OUT/config.yaml of an
            earlier run); flags override its values.
        print_config: print the resolved settings as YAML (a file --config reads) and exit without training.
        mix_mode: set sum.mode, cascade.mode and gradual.mode at once: group (N rows -> N/k mixed rows, the
            thesis's) or permute (keep N rows); it overrides those three.
    """

    settings: Annotated[TrainConfig, tyro.conf.arg(name="")]
    options: Annotated[Options, tyro.conf.arg(name="")]
    config: str | None = None
    print_config: Annotated[bool, tyro.conf.FlagCreatePairsOff] = False
    mix_mode: Literal["group", "permute"] | None = None

    def print_settings(self) -> str:
        """The YAML of ``--print-config``: the settings (``--mix-mode`` applied), then the command's own options."""
        return config_yaml(self.train_config(), self.options)

    def train_config(self) -> TrainConfig:
        """The settings, ``--mix-mode`` applied."""
        cfg = self.settings
        if self.mix_mode is None:
            return cfg
        return replace(cfg, sum=replace(cfg.sum, mode=self.mix_mode), cascade=replace(cfg.cascade, mode=self.mix_mode),
                       gradual=replace(cfg.gradual, mode=self.mix_mode))


class _RefusedSetting(Exception):
    """A config dataclass refused a value while tyro built it; carries the ValueError (as ``__cause__``).

    Not a ValueError on purpose: tyro turns a nested constructor's ValueError into its own multi-line error
    box and exits, while regpipe reports a refused setting as one line (``regpipe train: error: ...``).
    """


def _refusals_reraised(registry: tyro.constructors.ConstructorRegistry) -> None:
    """The config dataclasses are built as tyro builds dataclasses, but their ValueErrors pass through tyro."""

    @registry.struct_rule
    def rule(info: tyro.constructors.StructTypeInfo) -> tyro.constructors.StructConstructorSpec | None:
        if not (is_dataclass(info.type) and info.type.__module__ == TrainConfig.__module__):
            return None
        spec = dataclass_rule(info)
        if spec is None:
            return None

        def instantiate(*args: Any, **kwargs: Any) -> Any:
            try:
                return info.type(*args, **kwargs)
            except ValueError as err:
                raise _RefusedSetting(str(err)) from err

        return replace(spec, instantiate=instantiate)


def _comma_lists(registry: tyro.constructors.ConstructorRegistry) -> None:
    """``tuple[int, ...]`` and ``tuple[str, ...]`` fields read ``4,2,1`` (the CLI's form before tyro) as well as
    ``4 2 1`` (tyro's)."""

    @registry.primitive_rule
    def rule(info: tyro.constructors.PrimitiveTypeInfo) -> tyro.constructors.PrimitiveConstructorSpec | None:
        args = getattr(info.type, "__args__", ())
        if info.type_origin is not tuple or len(args) != 2 or args[1] is not Ellipsis or args[0] not in (int, str):
            return None
        item = args[0]

        def parse(tokens: list[str]) -> tuple[Any, ...]:
            return tuple(item(part.strip()) for token in tokens for part in token.split(",") if part.strip())

        return tyro.constructors.PrimitiveConstructorSpec(
            nargs="*", metavar=f"{item.__name__.upper()}[,{item.__name__.upper()}...]", instance_from_str=parse,
            is_instance=lambda value: isinstance(value, tuple) and all(isinstance(v, item) for v in value),
            str_from_instance=lambda value: [",".join(map(str, value))])


def as_default(cfg: TrainConfig, given: set[str] | frozenset[str] = frozenset()) -> TrainConfig:
    """``cfg`` as the defaults of a command line: each field that ``TrainConfig`` resolves from others
    (:data:`~regpipe.engine.config.RESOLVED_FIELDS`) and that ``given`` (the keys a config file set) does not
    name is put back to the value that asks for its resolution, so that the final settings resolve it:
    ``--image-size 64`` then gives ``val_resize`` 73, not the 256 resolved from the default 224.

    The returned object is only read field by field (tyro's defaults), never run.
    """
    unresolved = replace(cfg)
    for name, value in RESOLVED_FIELDS.items():
        if name not in given:
            object.__setattr__(unresolved, name, value)  # frozen: this copy holds the request, not a number
    return unresolved


def _config_file(argv: Sequence[str]) -> str | None:
    """The ``--config`` path of a command line (the last one), read before the other flags."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(list(argv))
    return known.config


def _defaults(path: str | None, options_type: type, base: TrainConfig) -> tuple[TrainConfig, Any]:
    """The settings and options a config file gives (``base`` and the options' defaults without one; a file
    without ``out`` keeps ``base.out``, the command's default folder)."""
    if path is None:
        return as_default(base), options_type()
    data = load_yaml(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of settings (key: value lines), got {type(data).__name__}")
    own = {f.name for f in fields(options_type)}
    settings = config_from_dict({"out": base.out, **{k: v for k, v in data.items() if k not in own}}, path)
    options = config_from_dict({k: v for k, v in data.items() if k in own}, path, options_type)
    return as_default(settings, set(data)), options


def parse_command(argv: Sequence[str], *, prog: str, description: str, out: str,
                  options_type: type[Options] = NoOptions) -> Command[Options]:  # type: ignore[assignment]
    """Parse a command line of ``regpipe train`` / ``compare``.

    Args:
        argv: the arguments after the command's name.
        out: the default of ``--out``.
        options_type: the command's own options, a frozen dataclass documented like the configs.

    Returns:
        The parsed :class:`Command`; its settings are built (each dataclass checked its fields), the
        cross-field checks are left to :func:`~regpipe.engine.config_checks.check_config`.

    Raises:
        ValueError, FileNotFoundError: a bad ``--config`` file (one line naming the file and the key).
        SystemExit: ``--help``, or a bad flag (tyro prints what is wrong).
    """
    path = _config_file(argv)
    settings, options = _defaults(path, options_type, TrainConfig(out=out))
    registry = tyro.constructors.ConstructorRegistry()
    _comma_lists(registry)
    _refusals_reraised(registry)
    try:
        return tyro.cli(Command[options_type], args=list(argv), prog=prog,  # type: ignore[valid-type]
                        description=description, default=Command(settings=settings, options=options), registry=registry)
    except _RefusedSetting as refused:
        raise refused.__cause__ from None  # the dataclass's own ValueError, which names the setting



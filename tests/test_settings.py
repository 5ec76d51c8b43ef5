"""Every setting defined once: the CLI and YAML config files generated from the config dataclasses."""

from __future__ import annotations

import json
import subprocess
import sys
import typing
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest
import yaml

from regpipe.cli import main
from regpipe.cli.train import parse_train
from regpipe.engine.config import TrainConfig, config_from_dict, config_to_dict, read_config
from regpipe.engine.config_checks import check_config

TINY = ["--samples-per-class", "4", "--val-per-class", "2", "--batch-size", "8", "--epochs", "2", "--no-progress"]

#: The flags of the hand-written CLI before the flags were generated (regpipe/cli/options.py), and the setting
#: each set: each must still set it (``--mix-mode`` set three and is tested on its own).
OLD_FLAGS = {
    "--recipe": "recipe", "--seed": "seed", "--out": "out", "--checkpoint-out": "checkpoint_out",
    "--data": "dataset", "--dataset": "dataset", "--image-size": "image_size", "--val-resize": "val_resize",
    "--workers": "workers", "--cache-dir": "cache_dir", "--data-dir": "data_dir", "--shape": "shape",
    "--samples-per-class": "samples_per_class", "--val-per-class": "val_per_class", "--epochs": "epochs",
    "--batch-size": "batch_size", "--eval-batch-size": "eval_batch_size", "--amp": "amp",
    "--checkpoint-every": "checkpoint_every", "--lr": "lr", "--schedule": "schedule",
    "--plateau-factor": "plateau_factor", "--plateau-patience": "plateau_patience", "--eval-every": "eval_every",
    "--eval-subset": "eval_subset", "--weight-decay": "weight_decay", "--loss": "loss", "--model": "model",
    "--device": "device", "--loader": "loader", "--k": "sum.k", "--k0": "gradual.k0",
    "--fine-tune-frac": "gradual.fine_tune_frac", "--stages": "cascade.stages", "--patience": "cascade.patience",
    "--stop-at": "cascade.stop_at", "--tta-draws": "tta_draws", "--patchup-layers": "patchup.layers",
    "--patchup-loss": "patchup.loss", "--delta-k": "loss_delta.k", "--order": "loss_order.order",
    "--replicas": "replication.replicas", "--inv-layers": "invariance.layers", "--inv-alpha": "invariance.alpha",
    "--inv-ratio": "invariance.ratio", "--sal-weight": "saliency.weight", "--sign-iters": "sign.iters",
    "--sign-eta": "sign.eta", "--sign-layer": "sign.layer", "--sign-teacher": "sign.teacher",
    "--cutmix-alpha": "cutmix.alpha", "--cutmix-prob": "cutmix.prob", "--cutout-length": "cutout.length",
    "--mixup-alpha": "mixup.alpha",
}
#: The old on/off flags (store_true): the flag alone and the setting it gives.
OLD_SWITCHES = {"--resume": ("resume", True), "--channels-last": ("channels_last", True),
                "--no-bn-recalibration": ("bn_recalibration", False), "--delta-relative": ("loss_delta.relative", True),
                "--no-progress": ("progress", False)}


def _leaves(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(dotted path, type, default)`` of every setting, the nested dataclasses walked."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            found += _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.append((prefix + f.name, hints[f.name], f.default if f.default is not MISSING else f.default_factory()))
    return found


def _other_value(kind: Any, default: Any) -> Any:
    """A valid value of ``kind`` other than ``default`` (each dataclass accepts it on its own)."""
    args = [a for a in get_args(kind) if a is not type(None)]
    if get_origin(kind) is Literal:
        return next(choice for choice in get_args(kind) if choice != default)
    if kind is bool:
        return not default
    if get_origin(kind) is tuple:
        return (8, 4) if args[0] is int else ("layer4",)
    if int in args or kind is int:
        return 7 if not isinstance(default, int) else default + 1
    if kind is float:
        return default / 2
    return f"not-{default}"  # str or str | None


#: str settings that take words, not any string: a valid value other than the default
WORD_SETTINGS = {"augment": "flip"}


def _tokens(flag: str, value: Any) -> list[str]:
    if isinstance(value, bool):  # tyro's pair: --name / --no-name (a nested one: --group.no-name)
        head, _, name = flag[2:].rpartition(".")
        return [flag] if value else [f"--{head + '.' if head else ''}no-{name}"]
    if isinstance(value, tuple):
        return [",".join(map(str, value))]
    return [str(value)]


def _expected(path: str, value: Any, **others: Any) -> dict[str, Any]:
    """The settings with one changed, built from a mapping (the YAML route, not the command line's)."""
    *groups, name = path.split(".")
    data: dict[str, Any] = {"out": "runs/train", **others}
    target = data
    for group in groups:
        target = target.setdefault(group, {})
    target[name] = value
    return config_to_dict(config_from_dict(data, "expected"))


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def test_every_setting_has_a_flag_that_sets_it_alone() -> None:
    """Walk the dataclasses: each setting's flag (``--group.name``) changes that setting and nothing else."""
    leaves = _leaves()
    assert len(leaves) == 68  # 39 run settings and 29 of the 13 algorithms' dataclasses
    for path, kind, default in leaves:
        value = WORD_SETTINGS.get(path) or _other_value(kind, default)
        parsed = parse_train([_flag(path), *_tokens(_flag(path), value)])
        assert config_to_dict(parsed) == _expected(path, value), path
    assert len({_flag(path) for path, _, _ in leaves}) == len(leaves)


def test_every_word_setting_refuses_an_unknown_word_naming_its_choices() -> None:
    """Each ``Literal`` setting's dataclass refuses a word outside its annotation, naming the setting, the word
    and every choice the annotation lists (built directly: the dataclass's own check, not the parser's)."""
    hints = typing.get_type_hints(TrainConfig)
    checked = []
    for path, kind, _ in _leaves():
        if get_origin(kind) is not Literal:
            continue
        group, _, name = path.rpartition(".")
        with pytest.raises(ValueError) as refused:
            (hints[group] if group else TrainConfig)(**{name: "not-a-choice"})
        message = str(refused.value)
        assert f"{name} must be" in message and "'not-a-choice'" in message, message
        assert all(repr(choice) in message for choice in get_args(kind)), message
        checked.append(path)
    assert sorted(checked) == sorted(["sum.mode", "cascade.mode", "gradual.mode", "patchup.loss", "loss_order.order",
                                      "shape", "loss", "logger", "loader", "amp", "schedule"])


def test_every_setting_has_its_help_written_once_in_its_class() -> None:
    """The help of each flag is its field's entry in its dataclass's ``Attributes:`` section, which tyro reads:
    every field has one, no entry names a field that does not exist, and the entries reach ``--help``."""
    import docstring_parser

    from regpipe.cli.compare import CompareOptions
    from regpipe.cli.settings import Command

    hints = typing.get_type_hints(TrainConfig)
    classes = {TrainConfig, CompareOptions, Command} | {hints[f.name] for f in fields(TrainConfig)
                                                       if is_dataclass(hints[f.name])}
    assert len(classes) == 16
    for cls in classes:
        documented = {p.arg_name: p.description for p in docstring_parser.parse(cls.__doc__).params}
        assert set(documented) == {f.name for f in fields(cls)}, cls.__name__
        assert all(text and text.strip() for text in documented.values()), cls.__name__
    shown = subprocess.run([sys.executable, "-m", "regpipe", "train", "--help"], capture_output=True, text=True,
                           check=True).stdout
    assert "copies per seed (m) of the" in shown and "loss-delta-external: held-out validation rows" in shown


@pytest.mark.parametrize("flag", sorted(OLD_FLAGS))
def test_the_old_flags_still_set_their_setting(flag: str) -> None:
    path = OLD_FLAGS[flag]
    kind, default = next((k, d) for p, k, d in _leaves() if p == path)
    value = _other_value(kind, default)
    assert config_to_dict(parse_train([flag, *_tokens(_flag(path), value)])) == _expected(path, value)


@pytest.mark.parametrize("switch", sorted(OLD_SWITCHES))
def test_the_old_switches_still_work_alone(switch: str) -> None:
    path, value = OLD_SWITCHES[switch]
    assert config_to_dict(parse_train([switch])) == _expected(path, value)


def test_mix_mode_sets_the_three_modes_and_lists_read_commas_or_spaces() -> None:
    cfg = parse_train(["--mix-mode", "permute"])
    assert (cfg.sum.mode, cfg.cascade.mode, cfg.gradual.mode) == ("permute",) * 3
    assert parse_train(["--stages", "8,4,2"]).cascade.stages == parse_train(["--stages", "8", "4", "2"]).cascade.stages \
        == (8, 4, 2)
    assert parse_train(["--inv-layers", "layer1,layer3"]).invariance.layers == ("layer1", "layer3")


def test_resolved_settings_follow_the_flags() -> None:
    """val_resize and samples_per_class left at their defaults are resolved from the final image size and data."""
    assert parse_train(["--image-size", "64"]).val_resize == 73
    assert parse_train([]).samples_per_class == 100
    assert parse_train(["--data", "imagefolder:/x"]).samples_per_class is None
    assert parse_train(["--samples-per-class", "0"]).samples_per_class is None  # 0: every image, as before


def test_print_config_prints_the_resolved_settings_and_trains_nothing(tmp_path: Path, capsys) -> None:
    argv = ["--recipe", "sum", "--k", "2", "--image-size", "64", "--out", str(tmp_path / "run")]
    assert main(["train", *argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == config_to_dict(parse_train(argv))
    assert printed["val_resize"] == 73 and printed["sum"] == {"k": 2, "mode": "group"}
    assert len(printed) == len(fields(TrainConfig))
    assert not (tmp_path / "run").exists()


def _epochs(out: Path) -> list[tuple[float, float]]:
    rows = json.loads((out / "metrics.json").read_text())["epochs"]
    return [(row["train_loss"], row["test_accuracy"]) for row in rows]


def test_a_runs_config_yaml_repeats_the_run(fake_dir: Path, tmp_path: Path) -> None:
    """run -> OUT/config.yaml -> `train --config OUT/config.yaml --out NEW`: the same per-epoch losses."""
    first, again = tmp_path / "first", tmp_path / "again"
    assert main(["train", "--recipe", "sum", "--k", "2", "--lr", "0.1", "--data-dir", str(fake_dir), "--out",
                 str(first), *TINY]) == 0
    written = read_config(first / "config.yaml")
    assert written == parse_train(["--recipe", "sum", "--k", "2", "--lr", "0.1", "--data-dir", str(fake_dir), "--out",
                                   str(first), *TINY])
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(again)]) == 0
    assert _epochs(again) == _epochs(first) and len(_epochs(first)) == 2
    assert yaml.safe_load((again / "config.yaml").read_text()) == {**yaml.safe_load((first / "config.yaml").read_text()),
                                                                    "out": str(again)}


def test_flags_override_the_file_and_unset_resolved_settings_follow_them(tmp_path: Path) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text("epochs: 3\nsum: {k: 3}\n")
    cfg = parse_train(["--config", str(path), "--epochs", "5", "--image-size", "64"])
    assert (cfg.epochs, cfg.sum.k, cfg.val_resize, cfg.out) == (5, 3, 73, "runs/train")  # out: train's default
    assert parse_train(["--epochs", "5", "--config", str(path)]).epochs == 5  # flags win wherever they stand


@pytest.mark.parametrize("text, needle", [
    ("epoch: 3\n", "unknown key 'epoch'"),
    ("sum:\n  kk: 3\n", "unknown key 'sum.kk'"),
    ("epochs: three\n", "epochs must be int, got 'three'"),
    ("sum: {mode: mixed}\n", "sum.mode must be one of 'group', 'permute', got 'mixed'"),
    ("cascade: {stages: [1, 2]}\n", "cascade.stages must be strictly decreasing integers >= 1, got (1, 2)"),
    ("lr: -1\n", "train.lr must be in [0.0, None], got -1"),
    ("epochs: [3\n", "not valid YAML at line 2"),
    ("- 3\n", "expected a mapping of settings"),
])
def test_a_bad_config_file_is_named_in_one_line(text: str, needle: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and needle in err, err
    assert not (tmp_path / "run").exists()


def test_compare_reads_a_runs_config_yaml(fake_dir: Path, tmp_path: Path, capsys) -> None:
    """The file's settings are every run's; its recipe and seed give the defaults of --recipes and --first-seed."""
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({**config_to_dict(parse_train(["--data-dir", str(fake_dir), *TINY])),
                                    "recipe": "baseline", "seed": 3, "lr": 0.07}))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(path), "--seeds", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    summary = json.loads((out / "compare.json").read_text())["summary"]
    assert [(row["recipe"], row["seeds"]) for row in summary] == [("baseline", [3])]
    ran = read_config(out / "baseline" / "seed3" / "config.yaml")
    assert ran == config_from_dict({**yaml.safe_load(path.read_text()), "out": str(out / "baseline" / "seed3")},
                                   "expected")
    assert main(["compare", "--config", str(path), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipes"] is None and printed["lr"] == 0.07 and printed["seeds"] == 3


@pytest.mark.parametrize("changes, needle", [
    ({"resume": True}, "train.resume needs train.out"),
    ({"dataset": "imagefolder:/x", "samples_per_class": 8}, "samples_per_class=8 is a small-data option"),
    ({"dataset": "imagefolder:/x", "recipe": "loss-order"}, "['loss-order'] read the whole training set in memory"),
    ({"dataset": "beton:a.beton,b.beton", "loader": "ffcv", "schedule": "plateau"}, "--schedule plateau decides"),
    ({"dataset": "beton:a.beton,b.beton", "loader": "ffcv", "recipe": "cascade"}, "recipe 'cascade' decides from a"),
    ({"dataset": "beton:a.beton,b.beton", "loader": "ffcv", "recipe": "loss-delta-external"},
     "recipe 'loss-delta-external' decides from a"),
    ({"dataset": "beton:a.beton,b.beton", "loader": "ffcv", "eval_subset": 5}, "--eval-subset is not available"),
    ({"dataset": "beton:a.beton,b.beton"}, "add --loader ffcv"),
    ({"image_size": 96, "val_resize": 256}, "train.val_resize=256 is 2.67 x train.image_size=96"),
    ({"cascade": {"stages": [4, 2], "stop_at": 5}}, "cascade.stop_at=5 leaves none of the stages (4, 2)"),
    ({"recipe": "sum+gradual"}, "take over"),
    ({"logger": "tensorboard"}, "train.logger='tensorboard' writes under train.out"),
    ({"dataset": "imagefolder:/x", "augment": "flip"}, "--augment flip: imagefolder:... data is always augmented"),
    ({"dataset": "imagefolder:/x", "augment_pad": 2}, "--augment-pad 2 pads the crop of in-memory data"),
    ({"augment": "crop", "augment_pad": 0}, "--augment crop with --augment-pad 0"),
])
def test_cross_field_checks_are_in_check_config(changes: dict, needle: str) -> None:
    """Each setting is valid alone (the dataclasses build); check_config refuses the combination, reading nothing."""
    cfg = config_from_dict(changes, "test")
    with pytest.raises(ValueError, match=None) as err:
        check_config(cfg)
    assert needle in str(err.value)

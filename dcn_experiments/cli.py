"""Turn user errors into one line on stderr and exit code 2 (no traceback); check overrides before Hydra."""

from __future__ import annotations

import difflib
import functools
import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, IntervalSweep, Override
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dcn_experiments.errors import ConfigError, UserError

F = TypeVar("F", bound=Callable[..., Any])


def one_line(error: BaseException) -> str:
    """The error's message on one line (re-raised DataLoader worker errors keep only the cause)."""
    text = str(error).strip()
    if "Original Traceback" in text:  # raised inside a DataLoader worker
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def exit_on_user_error(fn: F) -> F:
    """Decorator: a ``UserError`` (also one re-raised from a DataLoader worker) exits with code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            sys.exit(2)
        except RuntimeError as error:
            if "Caught DataError" in str(error) or "Caught ConfigError" in str(error):
                print(f"error: {one_line(error)}", file=sys.stderr)
                sys.exit(2)
            raise

    return wrapper  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Command-line overrides checked before Hydra runs, so that a typo is one line, not a report.

CONFIG_DIR = Path(__file__).resolve().parent / "conf"
CONFIG_NAME = "train"
# Flags after which Hydra composes another config or composes nothing: leave the command line to Hydra.
_HANDS_OFF = {
    "-h",
    "--help",
    "--hydra-help",
    "--version",
    "-i",
    "--info",
    "-sc",
    "--shell-completion",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
}
_WITH_VALUE = {"-c", "--cfg", "-p", "--package"}  # flags that take the next argument as their value
_MULTIRUN = {"-m", "--multirun"}
_SWEEP_VALUES = 8  # sweep values composed per swept override (the first ones)
# Keys whose default is null but whose value must be a number (the types of the others follow their defaults).
_NULLABLE_NUMBERS = {
    "trainer.limit_train_batches": "a number",
    "trainer.limit_val_batches": "a number",
    "trainer.grad_clip": "a number",
    "trainer.checkpoint_every_n_steps": "an integer",
    "dataset.image_size": "an integer",
}
_ABSENT = object()
_CHOICES = {"trainer.precision": ("32", "bf16", "16")}
# Keys that were replaced: an old command line gets a one-line answer naming the new key.
RENAMED_KEYS = {
    "trainer.amp": "trainer.precision=32|bf16|16 (amp=true with amp_dtype=bfloat16 is precision=bf16)",
    "trainer.amp_dtype": "trainer.precision=32|bf16|16 (bfloat16 is bf16, float16 is 16)",
}


def check_overrides(argv: list[str]) -> None:
    """Check a ``dcn-train`` command line's overrides; a bad one raises ``ConfigError`` with one line.

    Catches what Hydra would report in many lines (unknown group option, unknown key, unparsable
    override, a sweep without ``-m``), values whose type does not match the key's default, and an
    output folder that cannot be created. Every value of a sweep is composed (the first few of a
    long one). Flags and ``hydra.*`` overrides are left to Hydra.
    """
    split = _split_argv(argv)
    if split is None:
        return
    lines, multirun, composes_only = split
    overrides = [_parse(line) for line in lines]
    hydra_overrides = [o for o in overrides if o.key_or_group.split("/")[0].split(".")[0] == "hydra"]
    user = [o for o in overrides if o not in hydra_overrides]
    swept = [o for o in user if o.is_sweep_override()]
    if swept and not multirun:
        raise ConfigError(
            f"{swept[0].input_line} lists several values; add -m (--multirun) to run one job per value, or give one"
        )
    for override in user:
        _check_renamed(override)
        _check_group_option(override)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for combination in _combinations(user):
            _check_combination(combination)
    if not composes_only:
        _check_output_dir(hydra_overrides, multirun)


def parse_command_line(argv: list[str]) -> tuple[list[Override], bool] | None:
    """The overrides of a ``dcn-train`` command line and whether it is a multirun; None when a flag
    hands the command line to Hydra alone (help, another config)."""
    split = _split_argv(argv)
    if split is None:
        return None
    lines, multirun, _ = split
    return [_parse(line) for line in lines], multirun


def sweep_size(overrides: list[Override]) -> int:
    """Jobs a basic sweep of ``overrides`` runs (the product of the swept values' counts)."""
    size = 1
    for override in overrides:
        if not override.is_sweep_override():
            continue
        sweep = override.value()
        if isinstance(sweep, Glob):
            size *= len(sweep.filter(_group_options(override.key_or_group) or []))
        elif not isinstance(sweep, IntervalSweep):
            size *= sum(1 for _ in override.sweep_string_iterator())
    return size


def _split_argv(argv: list[str]) -> tuple[list[str], bool, bool] | None:
    """(overrides, multirun, prints-config-only), or None when Hydra should see the command line alone."""
    lines, multirun, composes_only, skip = [], False, False, False
    for arg in argv:
        if skip:
            skip = False
            continue
        flag = arg.split("=", 1)[0] if arg.startswith("--") else arg
        if flag in _HANDS_OFF:
            return None
        if flag in _MULTIRUN:
            multirun = True
        elif flag in _WITH_VALUE:
            composes_only |= flag in {"-c", "--cfg"}
            skip = "=" not in arg
        elif arg.startswith("-"):
            return None  # a flag this check does not know: Hydra's argparse answers it
        else:
            lines.append(arg)
    return lines, multirun, composes_only


def _parse(line: str) -> Override:
    try:
        return OverridesParser.create().parse_override(line)
    except HydraException as error:  # OverrideParseException and the parser's own
        reason = str(error).splitlines()[0].split(" expecting ")[0]
        raise ConfigError(
            f"cannot parse the override {line!r} ({reason}); write key=value, quoting values with spaces or "
            "brackets (see https://hydra.cc/docs/advanced/override_grammar/basic)"
        ) from None


def _check_renamed(override: Override) -> None:
    key = override.key_or_group
    if key in RENAMED_KEYS:
        raise ConfigError(f"{override.input_line}: {key} was replaced; use {RENAMED_KEYS[key]}")


def _group_options(group: str) -> list[str] | None:
    """The options of config group ``group`` (the yaml files in ``conf/<group>/``), None if not a group."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if group and folder.is_dir() else None


def _values(override: Override) -> list[Any]:
    """The values a (possibly sweeping) override sets: one, or the first few of its sweep."""
    if not override.is_sweep_override():
        return [override.value()]
    sweep = override.value()
    if isinstance(sweep, Glob):
        return sweep.filter(_group_options(override.key_or_group) or [])[:_SWEEP_VALUES]
    if isinstance(sweep, IntervalSweep):
        return []  # a continuous range for an optimising sweeper: nothing to enumerate
    return list(itertools.islice(override.sweep_string_iterator(), _SWEEP_VALUES))


def _check_group_option(override: Override) -> None:
    options = _group_options(override.key_or_group)
    if options is None or override.is_delete():
        return
    for value in _values(override):
        if value is not None and str(value) not in options:
            raise ConfigError(
                f"{override.key_or_group}={value}: Could not find '{override.key_or_group}/{value}'; "
                f"choose one of: {', '.join(options)} (conf/{override.key_or_group}/)"
            )


def _combinations(overrides: list[Override]) -> list[list[tuple[Override, str]]]:
    """Override lines to compose: every sweep at its first value, then each other value of each sweep."""

    def line(override: Override, value: Any) -> str:
        if not override.is_sweep_override():
            return override.input_line
        return f"{override.get_key_element()}={value}"

    values = {id(o): _values(o) for o in overrides}
    first = [(o, line(o, values[id(o)][0])) for o in overrides if values[id(o)]]
    combinations = [first]
    for index, (override, _) in enumerate(first):
        for value in values[id(override)][1:]:
            combinations.append([*first[:index], (override, line(override, value)), *first[index + 1 :]])
    return combinations


def _is_group(override: Override) -> bool:
    return _group_options(override.key_or_group) is not None


def _compose(lines: list[str]) -> DictConfig:
    try:
        return compose(config_name=CONFIG_NAME, overrides=lines)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"{' '.join(lines)}: {one_line(error)}") from None


def _check_combination(combination: list[tuple[Override, str]]) -> None:
    """Compose one combination of override values: keys must exist and values fit their default's type."""
    group_lines = [line for o, line in combination if _is_group(o)]
    base = _compose(group_lines)
    keyed = [(o, line) for o, line in combination if not _is_group(o) and not o.is_add() and not o.is_force_add()]
    for override, line in keyed:
        if OmegaConf.select(base, override.key_or_group, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
            raise ConfigError(_unknown_key(base, override.key_or_group, line, group_lines))
    try:
        composed = compose(config_name=CONFIG_NAME, overrides=[line for _, line in combination])
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"{' '.join(line for _, line in combination)}: {one_line(error)}") from None
    for override, _ in keyed:
        if not override.is_delete():
            key = override.key_or_group
            default = OmegaConf.select(base, key, throw_on_resolution_failure=False)
            value = OmegaConf.select(composed, key, throw_on_resolution_failure=False)
            _check_type(key, default, value)
            _check_choice(key, value)


def _unknown_key(base: DictConfig, key: str, line: str, group_lines: list[str]) -> str:
    """One line for an override of a key the composed config lacks: the node's keys and the closest one."""
    parts = key.split(".")
    depth = 0
    node: Any = base
    while depth < len(parts) - 1 and isinstance(node, DictConfig) and parts[depth] in node:
        node = node[parts[depth]]
        depth += 1
    parent = ".".join(parts[:depth])
    if not isinstance(node, DictConfig):
        return f"{line}: {parent} is a value, not a group of keys; set {parent}=VALUE instead"
    keys = [k for k in node if not (depth == 0 and k == "hydra")]
    close = difflib.get_close_matches(parts[depth], keys, n=1)
    where = f"{parent}." if parent else ""
    guess = f"did you mean {where}{close[0]}? " if close else ""
    context = f" with {' '.join(group_lines)}" if group_lines else ""
    return (
        f"{line}: no key {key!r} in the config{context}; {guess}keys of {parent or 'the top level'}: "
        f"{', '.join(map(str, keys))}{'' if line.startswith('~') else f' (a new key needs +{line})'}"
    )


def _check_choice(key: str, value: Any) -> None:
    """Keys with a fixed set of values (which Hydra may parse as numbers: ``trainer.precision=16``)."""
    choices = _CHOICES.get(key)
    if choices is not None and str(value).lower() not in choices:
        raise ConfigError(f"{key}={_as_yaml(value)} is not valid; choose one of {' | '.join(choices)}")


def _check_type(key: str, default: Any, value: Any) -> None:
    """``value`` must have the type of ``default`` (numbers for null-default numeric keys)."""
    nullable = key in _NULLABLE_NUMBERS
    if nullable:
        expected = _NULLABLE_NUMBERS[key]
    elif isinstance(default, bool):
        expected = "true or false"
    elif isinstance(default, int):
        expected = "an integer"
    elif isinstance(default, float):
        expected = "a number"
    else:
        return  # strings, lists and null defaults: the code that reads the key checks them
    if value is None and nullable:
        return
    fits = {
        "true or false": isinstance(value, bool),
        "an integer": isinstance(value, int) and not isinstance(value, bool),
        "a number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[expected]
    if not fits:
        raise ConfigError(
            f"{key}={_as_yaml(value)} is not {expected}{' or null' if nullable else ''}; give {key}=VALUE like "
            f"the default {_as_yaml(default)}"
        )


def _as_yaml(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _check_output_dir(hydra_overrides: list[Override], multirun: bool) -> None:
    """The run (or sweep) folder must be creatable: its nearest existing parent a writable folder."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [o.value() for o in hydra_overrides if o.key_or_group == key and not o.is_sweep_override()]
    if given:
        template = str(given[-1])
    else:
        raw = yaml.safe_load((CONFIG_DIR / f"{CONFIG_NAME}.yaml").read_text())
        template = str(raw["hydra"]["sweep" if multirun else "run"]["dir"])
    target = Path(template.split("${", 1)[0] or ".").expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}={template}: {existing} is a file, not a folder; choose another {key}")
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".dcn-write-check-"):
            pass
    except OSError as error:
        raise ConfigError(
            f"{key}={template}: cannot create folders in {existing} ({error.strerror}); choose a writable {key}"
        ) from None

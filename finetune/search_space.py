"""The search space of ``finetune tune``: ``key=loguniform(1e-4,1e-1)``, ``uniform(a,b)``,
``int(a,b)`` or ``choice(a,b,c)`` (a choice may be a list: ``choice([0.08,1],[0.35,1])``)
on any config key, parsed and checked against the config
schema (every bound and choice must make a valid config) before any trial runs."""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

from finetune.config import SCHEMA_KEYS, load_config, parse_overrides, show_value
from finetune.errors import ConfigError, did_you_mean

KINDS = ("loguniform", "uniform", "int", "choice")
# Other libraries' names for them: refused by name rather than taken as a plain value.
ALIASES = ("log_uniform", "loguniform_float", "randint", "categorical", "float", "qloguniform",
           "quniform", "grid_search", "choices", "integer")
_FORM = re.compile(r"^\s*([A-Za-z_]+)\((.*)\)\s*$", re.S)
# Keys that decide which images train, validate and test: searching them would compare
# trials on different validation images (or on the test split).
NOT_SEARCHED = ("data.root", "data.source", "data.hf_name", "data.hf_config",
                "data.train_split", "data.test_split", "data.image_column",
                "data.label_column", "data.train_limit", "data.eval_limit", "data.split_seed",
                "data.classes", "data.val_split", "data.folds", "data.fold", "data.streaming",
                "output_dir", "resume", "overwrite", "recipe", "description")


@dataclass(frozen=True)
class Dimension:
    key: str
    kind: str  # one of KINDS
    low: float | int | None = None
    high: float | int | None = None
    choices: tuple = ()

    def distribution(self):
        """The Optuna distribution this dimension samples from."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.kind == "loguniform":
            return FloatDistribution(self.low, self.high, log=True)
        elif self.kind == "uniform":
            return FloatDistribution(self.low, self.high)
        elif self.kind == "int":
            return IntDistribution(self.low, self.high)
        elif self.kind == "choice":
            return CategoricalDistribution(self.choices)
        else:
            raise ValueError(f"unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")

    def describe(self) -> str:
        """As written on the command line, e.g. ``loguniform(0.0001,0.1)``."""
        if self.kind == "choice":
            return f"choice({','.join(map(str, self.choices))})"
        elif self.kind in ("loguniform", "uniform", "int"):
            return f"{self.kind}({self.low},{self.high})"
        else:
            raise ValueError(f"unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")

    def param(self, value: Any) -> Any:
        """A config value as this dimension's point: a list as its override text ``[a,b]``
        (an Optuna choice holds scalars only)."""
        if not isinstance(value, tuple | list):
            return value
        same = [c for c in self.choices if isinstance(c, str) and c.startswith("[")
                and [_scalar(t) for t in _items(c[1:-1]) if t.strip()] == list(value)]
        return same[0] if same else show_value(value)  # [0.08,1] is the list (0.08, 1.0)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` (a config's) is a point of this dimension."""
        if self.kind == "choice":
            value = self.param(value)
            return any(type(value) is type(c) and value == c for c in self.choices)
        elif self.kind in ("loguniform", "uniform", "int"):
            return (isinstance(value, int | float) and not isinstance(value, bool)
                    and self.low <= value <= self.high
                    and (self.kind != "int" or float(value).is_integer()))
        else:
            raise ValueError(f"unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")

    def corners(self) -> list:
        """The values that bound the space: checked as configs before any trial runs."""
        if self.kind == "choice":
            return list(self.choices)
        elif self.kind in ("loguniform", "uniform", "int"):
            return [self.low, self.high]
        else:
            raise ValueError(f"unknown kind {self.kind!r}; valid: {', '.join(KINDS)}")


def _scalar(text: str) -> Any:
    """A choice as a config value: an integer, a number, true/false, a list as its text
    ``[a,b]``, else a string."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return show_value([_scalar(t) for t in _items(text[1:-1]) if t.strip()])
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # quoted: may hold a comma
        text = text[1:-1]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _items(text: str) -> list[str]:
    """``text`` split at its commas outside brackets and quotes: ``a,[b,c],'d,e'`` is three
    items (a quote opens only at an item's start: ``it's`` is a word)."""
    items, depth, start, quote = [], 0, 0, None
    for i, ch in enumerate(text):
        if quote is not None:
            quote = None if ch == quote else quote
        elif ch in "'\"" and not text[start:i].strip():
            quote = ch
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
        else:
            depth += {"[": 1, "]": -1}.get(ch, 0)
    return [*items, text[start:]]


def _number(key: str, text: str, kind: str) -> float:
    try:
        value = int(text) if kind == "int" else float(text)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        raise ConfigError(f"{key}={kind}(...): '{text.strip()}' is not {what}.") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key}={kind}(...): the bounds must be finite, got {text.strip()}.")
    return value


def parse_dimension(key: str, value: str) -> Dimension | None:
    """``key=kind(args)`` as a :class:`Dimension`; None for a plain override (no form)."""
    match = _FORM.match(value)
    if match is None or match.group(1) not in KINDS:
        name = match.group(1) if match else ""
        if name and (difflib.get_close_matches(name, KINDS, cutoff=0.7) or name in ALIASES):
            raise ConfigError(f"{key}={value}: unknown search form '{name}'; valid: "
                              f"{', '.join(f'{k}(...)' for k in KINDS)}.")
        return None
    kind, args = match.group(1), _items(match.group(2))
    if kind == "choice":
        choices = [_scalar(a) for a in args if a.strip()]
        if len(choices) < 2:
            raise ConfigError(f"{key}={value}: choice(...) needs at least two values.")
        typed = [(type(c), c) for c in choices]  # True is not 1
        twice = [show_value(c) for i, c in enumerate(choices) if typed[i] in typed[:i]]
        if twice:
            raise ConfigError(f"{key}={value}: choice(...) lists {twice[0]} twice.")
        return Dimension(key, kind, choices=tuple(choices))
    if len(args) != 2:
        raise ConfigError(f"{key}={value}: {kind}(low,high) takes two bounds, got "
                          f"{len(args)}.")
    low, high = (_number(key, a, kind) for a in args)
    if low >= high:
        raise ConfigError(f"{key}={value}: the low bound must be below the high one.")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}={value}: a log range needs bounds > 0 (got {low}); use "
                          f"uniform(...) for a range from 0.")
    return Dimension(key, kind, low, high)


def split_space(args: list[str]) -> tuple[list[Dimension], list[str]]:
    """``(dimensions, plain overrides)`` of ``key=value`` arguments."""
    dims, fixed = [], []
    for arg in parse_overrides(args):
        key, _, value = arg.partition("=")
        dim = parse_dimension(key, value)
        if dim is None:
            fixed.append(arg)
        elif any(d.key == key for d in dims):
            raise ConfigError(f"{key} is searched twice; give it one range.")
        else:
            dims.append(dim)
    both = sorted({d.key for d in dims} & {a.partition("=")[0] for a in fixed})
    if both:
        raise ConfigError(f"{both[0]} is given a value and a range; search it or fix it.")
    return dims, fixed


def check_space(dims: list[Dimension], base: list[str]) -> None:
    """Every dimension a config key that may be searched, and every bound or choice a valid
    config on top of ``base`` (the recipe and fixed overrides)."""
    from finetune.assemble import check_model

    if not dims:
        raise ConfigError("nothing to search: give at least one key=loguniform(a,b), "
                          "uniform(a,b), int(a,b) or choice(a,b,...).")
    for dim in dims:
        if dim.key in NOT_SEARCHED:
            raise ConfigError(f"{dim.key} cannot be searched: trials must train, validate and "
                              f"test on the same images (and write where the search says); "
                              f"set it once for all trials, e.g. {dim.key}=VALUE.")
        if dim.key not in SCHEMA_KEYS:
            raise ConfigError(f"unknown config key '{dim.key}' in the search space."
                              f"{did_you_mean(dim.key, SCHEMA_KEYS)} Keys: `finetune show`.")
        for value in dim.corners():
            try:  # the config, and the model it names (built on the meta device: shapes only)
                check_model(load_config([*base, f"{dim.key}={show_value(value)}"]))
            except ConfigError as e:
                raise ConfigError(f"{dim.key}={dim.describe()}: {value} does not make a valid "
                                  f"config: {e}") from None


def as_override(key: str, value: Any) -> str:
    """A sampled value as a command-line override."""
    return f"{key}={show_value(value)}"

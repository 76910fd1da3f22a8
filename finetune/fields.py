"""Fields of JSON files a user may edit or damage, checked one by one: finetune's model.json
(``finetune.export`` owns it) and timm's config.json beside weights (read in
``finetune.models.pretrained``). A check returns what a field's value must be, or None when it
is fine; :func:`check_fields` raises one line naming the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError

Check = Callable[[Any, dict], "str | None"]
MAX_CHANS = 64  # images are read grey or RGB; a model may take a few more channels, not 10^5
MEAN_RANGE, STD_RANGE = (-1e3, 1e3), (1e-6, 1e3)  # of images scaled to [0, 1]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(lo: int, hi: int | None = None) -> Check:
    want = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
    return lambda v, _: None if is_int(v) and lo <= v <= (v if hi is None else hi) else want


def number(lo: float, hi: float, lo_open: bool = False) -> Check:
    want = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    return lambda v, _: (None if is_real(v) and (lo < v if lo_open else lo <= v) and v <= hi
                         else want)


def numbers(lo: float, hi: float, count: Callable[[dict], int | None], per: str) -> Check:
    """A list of finite numbers in [lo, hi], as many as ``count(obj)`` (None: any number)."""
    def check(v: Any, obj: dict) -> str | None:
        n = count(obj)
        if (isinstance(v, list) and v and (n is None or len(v) == n)
                and all(is_real(x) and lo <= x <= hi for x in v)):
            return None
        if n is None:
            return f"a list of numbers from {lo:g} to {hi:g}"
        return f"a list of {n} number{'s' * (n != 1)} from {lo:g} to {hi:g} (one per {per}={n})"
    return check


def one_of(choices: tuple[str, ...]) -> Check:
    return lambda v, _: None if isinstance(v, str) and v in choices else (
        f"one of {', '.join(choices)}")


def text(what: str, optional: bool = False) -> Check:
    want = f"{what} (a string{' or null' * optional})"
    return lambda v, _: None if (isinstance(v, str) and v) or (optional and v is None) else want


def mapping(v: Any, _: dict) -> str | None:
    return None if isinstance(v, dict) else "an object"


def boolean(v: Any, _: dict) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def check_fields(file: Path, obj: dict, checks: dict, error: type[FinetuneError], fix: str,
                 prefix: str = "") -> None:
    """Raise ``error`` naming ``file`` and the first field of ``obj`` whose value fails its
    check (fields absent are not checked); a dict of checks checks an object's own fields."""
    for key, check in checks.items():
        if key not in obj:
            continue
        value, name = obj[key], prefix + key
        want = mapping(value, obj) if isinstance(check, dict) else check(value, obj)
        if want is not None:
            shown = json.dumps(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise error(f"{file}: '{name}' must be {want}, got {shown}; {fix}")
        if isinstance(check, dict):
            check_fields(file, value, check, error, fix, f"{name}.")


def read_json_object(file: Path, error: type[FinetuneError], fix: str) -> dict:
    """The JSON object in ``file``; ``error`` naming it when it is not JSON or no object."""
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise error(f"{file} is not JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{file} holds no JSON object; {fix}")
    return data

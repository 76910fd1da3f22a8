"""Errors a user can fix; ``finetune`` prints their message and exits with status 2."""


class FinetuneError(Exception):
    """Base of every error that says what was wrong and how to fix it."""


class ConfigError(FinetuneError, ValueError):
    """A recipe or override that cannot describe a valid run."""


class DataError(FinetuneError, ValueError):
    """Input data that cannot be used."""


class WeightsError(FinetuneError, RuntimeError):
    """Pretrained weights were asked for but cannot be used."""


class ExportError(FinetuneError, RuntimeError):
    """An exported model that cannot be read back or written."""


class CheckpointError(FinetuneError, RuntimeError):
    """A checkpoint that is incomplete, damaged or changed since it was written."""


class OutputError(FinetuneError, OSError):
    """An output that could not be written (a full disk, a size limit, a read-only folder)."""


class TrainingError(FinetuneError, RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, ``""`` if it has none: what a one-line error quotes
    of a library's exception (the traceback-like rest stays out)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else ""


def one_line(e: BaseException) -> str:
    """``TypeName: first line of the message``."""
    return f"{type(e).__name__}: {first_line(e)}"


def did_you_mean(word: str, choices: list[str] | tuple[str, ...], cutoff: float = 0.6) -> str:
    """`` Did you mean 'X'?`` for the closest of ``choices``, or an empty string."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" Did you mean '{close[0]}'?" if close else ""

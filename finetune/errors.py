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


class TrainingError(FinetuneError, RuntimeError):
    """Training cannot go on (e.g. the loss is no longer finite)."""

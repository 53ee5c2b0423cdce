"""Errors that carry a one-line, user-facing message (the CLI prints them and exits non-zero)."""


class CifarExpError(Exception):
    """Base class: the message names the bad value or file and is shown to the user as is."""


class ConfigError(CifarExpError, ValueError):
    """A configuration value is out of range or unknown."""


class DataError(CifarExpError):
    """The dataset is missing, incomplete or holds an unreadable image."""


class TrainingDivergedError(CifarExpError):
    """The training loss became NaN or infinite."""


class TrackingError(CifarExpError):
    """The MLflow tracking store or a model URI cannot be used."""


class StorageError(CifarExpError):
    """The Optuna storage cannot be reached, or holds a study this search cannot continue."""


class ExportError(CifarExpError):
    """A model cannot be exported, written, or its export disagrees with the original."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name if the message is empty): for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""The one exception type users catch, and a log-once helper for announced fallbacks."""
import logging

log = logging.getLogger("egnn")
_said: set[str] = set()


class EgnnError(Exception):
    """Bad input or a broken promise: the message says what was wrong and what to do."""


class InputError(EgnnError, ValueError):
    """A malformed file, field or argument."""


class ConfigError(EgnnError, ValueError):
    """An invalid configuration."""


class DistributedError(EgnnError, RuntimeError):
    """A world or plan that does not match."""


class TrainingError(EgnnError, RuntimeError):
    """Training that cannot go on (a non-finite loss): the message says where and what to change."""


class KernelError(EgnnError, RuntimeError):
    """A Triton kernel that cannot run the call it was forced to (backend="triton")."""


def warn_once(key: str, message: str) -> None:
    """Log a fallback or warning once per process (never silently)."""
    if key in _said:
        return
    _said.add(key)
    log.warning(message)

"""Typed errors. Every message is one line that says what was expected and what was got."""


class ClusCaError(Exception):
    """Base class of every error clusca-trt raises on purpose."""


class ConfigError(ClusCaError, ValueError):
    """An option or configuration value is out of range or inconsistent."""


class CheckpointError(ClusCaError):
    """A checkpoint is missing, unreadable or does not match the model configuration."""


class EngineError(ClusCaError):
    """An engine directory or engine file is missing, corrupt or unusable."""


class EngineMismatchError(EngineError):
    """An engine directory was built with other settings than the ones requested."""


class BackendUnavailableError(ClusCaError):
    """A backend or execution provider was requested that this machine cannot run."""


class InputError(ClusCaError, ValueError):
    """A run-time input (labels, prompt, shapes) is invalid."""


class NonFiniteOutputError(EngineError):
    """The engines produced NaN or inf (from a non-finite weight or input, or an overflow)."""


def one_line(message: object, limit: int = 500) -> str:
    """The first non-empty line of ``message`` (an exception or text), at most ``limit`` characters:
    what every error message and log line quoting another library's error shows of it."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    text = lines[0] if lines else (type(message).__name__ if isinstance(message, BaseException) else "error")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: BaseException, limit: int = 500) -> str:
    """``TypeName: first line`` of an exception (``one_line``)."""
    return one_line(f"{type(error).__name__}: {one_line(error, limit)}", limit)

"""Errors that reach the user as one clear line (file, line, field), never a deep traceback."""


class OpenChatError(Exception):
    """Base class for errors caused by the user's input or configuration."""


class ConfigError(OpenChatError):
    """A configuration value is invalid; raised before any work starts."""


class CheckpointError(OpenChatError):
    """A checkpoint folder is missing files, has the wrong architecture or mis-shaped tensors."""


class DataError(OpenChatError):
    """Input data cannot be used (e.g. no supervised token at all)."""

"""User-facing errors.

Every error a user can cause (bad config, missing or corrupt data, a results or
partition file of the wrong schema) is an :class:`AlignFLError`. The CLI prints
its message as one line and exits with status 2, without a traceback.
"""


class AlignFLError(Exception):
    """An error caused by input: printed as one line, exit status 2."""


class ConfigError(AlignFLError):
    """The configuration file or a CLI flag is invalid."""


class DataError(AlignFLError):
    """A dataset file is missing, truncated or corrupt."""


class SchemaError(AlignFLError):
    """An HDF5 file does not have the layout this package writes."""


class MessageError(AlignFLError):
    """A message between ranks is malformed, too large or fails validation."""

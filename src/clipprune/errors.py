"""User-facing errors: one line naming the parameter or file and what was expected."""


class ClipPruneError(Exception):
    """An error caused by bad input (params, files, model names).

    Stages print ``str(err)`` on one line and exit non-zero; no traceback is shown to the user.
    """


class ParamError(ClipPruneError, ValueError):
    """A params.yaml value is missing, of the wrong type, or out of range."""


class DataError(ClipPruneError):
    """A data file or archive is missing, corrupt, or malformed."""


class ModelLoadError(ClipPruneError):
    """A model name cannot be resolved or its weights cannot be loaded."""


class MaskError(ClipPruneError):
    """A mask file does not fit the model it is applied to."""


class OutputError(ClipPruneError):
    """An output cannot be written: its directory is read-only, the disk is full, a file is in the way."""

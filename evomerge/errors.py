"""The exception hierarchy. The CLI turns any of these into one line and a non-zero exit."""


class EvomergeError(Exception):
    """Base class: a problem the user can fix; the message says what and where."""


class ConfigError(EvomergeError):
    """A recipe or search config is malformed (message names the field)."""


class CheckpointError(EvomergeError):
    """A model folder/file is missing, unreadable or incompatible (message names the file)."""


class CandidateError(EvomergeError):
    """A search candidate that cannot be scored for a reason of its own: its trial fails, the search goes on."""


class MergeError(EvomergeError):
    """Tensors cannot be merged as asked (shape mismatch, bad parameter value, ...)."""

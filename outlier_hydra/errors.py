"""The one exception type users see as a one-line error (no traceback unless debug=true)."""


class OutlierHydraError(Exception):
    """Bad input: a config key, a file or a model the run cannot use. The message names it."""

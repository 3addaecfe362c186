"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits 2."""


class LdmError(Exception):
    """Base of every error that names a problem with the user's input, config or data."""


class GateError(LdmError):
    """A quality gate failed (bootstrap model quality, evaluation floor)."""


class DataError(LdmError):
    """Input data is unusable (missing columns, empty dataset, broken invariant)."""

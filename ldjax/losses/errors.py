"""The error raised for malformed loss inputs."""


class LossInputError(ValueError):
    """A loss received arrays of the wrong shape/dtype or an invalid hyperparameter.

    The message names the argument (``field``) and what was expected, so the caller can
    find the offending input without a debugger.
    """

"""Errors that the ``advmim`` command prints as one line instead of a traceback."""


class EvaluationInputError(ValueError):
    """Input the evaluation cannot use (a dataset without labels, k larger than the training set, ...); the
    ``advmim`` command prints it as one line."""

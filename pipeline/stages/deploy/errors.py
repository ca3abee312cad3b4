"""The deploy stage's error."""


class DeployError(RuntimeError):
    """The deploy could not run or could not finish cleanly; the message says what to do."""

"""The error the run framework raises when a run cannot start or a stage failed."""


class RunError(RuntimeError):
    """The run cannot start or a stage failed; the message names the stage (or the problem) and the fix."""

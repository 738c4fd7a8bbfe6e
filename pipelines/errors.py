"""The project's errors that the command line prints as one line, with no traceback. They live apart so
`pipelines.cli` can catch them without importing MLflow or DSPy."""


class ConfigError(ValueError):
    """Bad configuration or input, reported as one line without a traceback."""


class LMServerError(RuntimeError):
    """The LM server could not be reached or started."""


class TrackingServerError(RuntimeError):
    """The tracking server stopped answering during a run; one line for the command line."""

"""The one exception type for mistakes in what the user gave (data, paths, option values, model names)."""


class UserInputError(ValueError):
    """Bad user input. The message says what was wrong, where (file, line, column) and how to fix it; the CLI
    prints it alone, without a traceback."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError, for callers that catch that)."""


class OutputExistsError(UserInputError, FileExistsError):
    """A folder the user asked us to write already holds something we would replace."""

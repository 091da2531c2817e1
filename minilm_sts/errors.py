"""The one exception type for mistakes in what the user gave (data, paths, option values, model names)."""


class UserInputError(ValueError):
    """Bad user input. The message says what was wrong, where (file, line, column) and how to fix it; the CLI
    prints it alone, without a traceback."""

"""Every exception type for mistakes in what the user gave (data, paths, option values, model names, dumps): each
derives from UserInputError, which the command line prints as one `error:` line."""


class UserInputError(ValueError):
    """Bad user input. The message says what was wrong, where (file, line, column) and how to fix it; the CLI
    prints it alone, without a traceback."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist (also a FileNotFoundError, for callers that catch that)."""


class OutputExistsError(UserInputError, FileExistsError):
    """A folder the user asked us to write already holds something we would replace."""


class PairDataError(UserInputError):
    """Bad input in a pair source; the message names the source, the row, the column and what was expected."""


class DumpError(UserInputError):
    """A dump that cannot be read; the message names the file and what is wrong."""

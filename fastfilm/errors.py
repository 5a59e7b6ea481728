"""The one exception type for bad user input."""


class UserError(Exception):
    """A problem with the user's input (file, record, flag). The CLI prints it without a
    traceback; the message must name the file, line/record or field at fault."""

"""The one error type for bad user input: the CLI prints it as one line and exits with status 2."""


class SpecError(ValueError):
    """A bad value: `field` is its dotted name (train.lr, resources.nodes), the message says the fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self):
        # Raised in tokenizing worker processes (datasets' num_proc) and sent back pickled: rebuild it
        # from its two parts, not from the formatted text (the default would call __init__ with one).
        return (type(self), (self.field, self.message))

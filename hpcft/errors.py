"""The one error type for bad user input: the CLI prints it as one line and exits with status 2."""


class SpecError(ValueError):
    """A bad value: `field` is its dotted name (train.lr, resources.nodes), the message says the fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field

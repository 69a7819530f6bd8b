"""Reading rendered scripts back as bash does, for tests."""
import shlex


def logical_lines(script: str):
    """Complete shell commands, continuation lines and multi-line quotes joined. Only \\n ends a bash
    line (str.splitlines would also split on \\x85 and friends)."""
    buf = ""
    for line in script.split("\n"):
        buf += line + "\n"
        try:
            shlex.split(buf, comments=True)
        except ValueError:
            continue
        yield buf.rstrip("\n")
        buf = ""

"""`python -m dpnas` and the `dpnas` command (``run``)."""

import sys


def run() -> int:
    """The command line, with a Ctrl-C during its imports (torch, Opacus: seconds) a one-line stop, as later."""
    try:
        from dpnas.cli import main
    except KeyboardInterrupt:
        print("dpnas: interrupted", file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())

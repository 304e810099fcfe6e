"""``python -m cutmix_pl`` and the ``cutmix-pl`` command: the CLI (cli.py), with a stop while it imports torch and
Lightning (seconds) ended in one line instead of a KeyboardInterrupt traceback or a silent kill, and one after the
command has succeeded ended with exit status 0."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

_SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())


class _Stopped(BaseException):
    pass


def _stop(signum: int, frame: Any) -> None:
    raise _Stopped(signum)


def main() -> None:
    previous = {sig: signal.signal(sig, _stop) for sig in _SIGNALS}
    try:
        from cutmix_pl.cli import main as cli_main
    except _Stopped as stop:
        signum = stop.args[0]
        print(f"cutmix-pl: stopped by {signal.Signals(signum).name} while starting; nothing was written",
              file=sys.stderr)
        raise SystemExit(128 + signum) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    cli_main()  # its return value (the CLI object) is not an exit status: a console script would exit 1 on it
    # Done and written: a stop during the interpreter's shutdown (seconds, torch's threads) ends it with its success,
    # its output flushed first (os._exit flushes nothing).
    sys.stdout.flush()
    sys.stderr.flush()
    for sig in _SIGNALS:
        signal.signal(sig, lambda signum, frame: os._exit(0))


if __name__ == "__main__":
    main()

"""What every tool's command line needs: bad input gets one line on stderr naming the tool and exit status 1
(never a traceback), progress goes to stderr, and results print as plain tables."""
import argparse
import os
import sys
import time
from pathlib import Path


def fail(message):
    """Bad input: one line on stderr naming the tool, exit status 1."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(1)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument gets one line (the tool's name and the problem) and exit 1."""
    def error(self, message):
        fail(message)


def run_main(main):
    """Run a tool's main(): Ctrl-C or a closed pipe (| head) end it with a one-line message, no traceback."""
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted")
    except BrokenPipeError:
        sys.stderr.close()  # nobody is reading; don't complain at exit either
        os._exit(1)


def check_out(path):
    """Fail now, before any work, if a figure cannot be written to path."""
    parent = Path(path).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot write {path}: {e.strerror or e}")
    if not os.access(parent, os.W_OK) or Path(path).is_dir():
        fail(f"cannot write {path}")


def log(message):
    """A progress line on stderr, with the time, so stdout holds only the results."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_table(headers, rows, title=None):
    """A plain fixed-width table; right-aligned columns except the first."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if title:
        print(title)
    for k, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))

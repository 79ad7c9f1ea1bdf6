"""matplotlib for the tools that draw figures: loaded only when a figure is drawn, to files only."""
from pathlib import Path

from cli import fail


def pyplot():
    """matplotlib.pyplot, drawing to files only; one line and exit 1 if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("matplotlib is not installed: pip install -r tools/requirements.txt")
    return plt


def save_figure(fig, out, dpi=110):
    try:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    except OSError as e:
        fail(f"cannot write {out}: {e.strerror or e}")

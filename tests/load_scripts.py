"""Import llama3-paged.py and llama3-naive.py as modules (their file names have hyphens).

    from load_scripts import load_script
    paged = load_script("paged")          # or "llama3-paged", or "llama3-paged.py"

The tools' loader does the work: each script is executed once per process and cached (in sys.modules, as
llama3_paged / llama3_naive). Importing a script runs no inference: both guard main() with
`if __name__ == "__main__"`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import common  # noqa: E402


def load_script(name):
    """The module for "paged" / "naive" (also accepts "llama3-paged", "llama3-paged.py", ...)."""
    key = Path(name).name.removesuffix(".py").removeprefix("llama3-")
    if key not in common.SCRIPTS:
        raise ValueError(f"unknown script {name!r}: expected one of {sorted(common.SCRIPTS)}")
    return common.load_script(key)

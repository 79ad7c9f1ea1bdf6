"""Import the scripts as modules (their file names have hyphens), with the tools' loader.

    from load_scripts import load_script
    paged = load_script("paged")  # "naive", "paged", "swap", "prefix", "samples" or "beams"

Each script is executed once per process and cached in sys.modules under its file name (llama3_naive,
llama3_paged, llama3_paged_swap, ...). Importing a script runs no inference: each guards main() with `if __name__ == "__main__"`.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from scripts import load_script  # noqa: E402, F401

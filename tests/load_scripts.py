"""Import llama3-paged.py and llama3-naive.py as modules (their file names have hyphens).

    from load_scripts import load_script
    paged = load_script("paged")          # or "llama3-paged", or "llama3-paged.py"

Each script is executed once per process and cached (in sys.modules, as llama3_paged / llama3_naive).
Importing a script runs no inference: both guard main() with `if __name__ == "__main__"`.
"""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {"paged": "llama3-paged.py", "naive": "llama3-naive.py"}


def load_script(name):
    """The module for "paged" / "naive" (also accepts "llama3-paged", "llama3-paged.py", ...)."""
    key = Path(name).name.removesuffix(".py").removeprefix("llama3-").removeprefix("llama3_")
    if key not in SCRIPTS:
        raise ValueError(f"unknown script {name!r}: expected one of {sorted(SCRIPTS)}")
    module_name = f"llama3_{key}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, REPO / SCRIPTS[key])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before exec: dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module

"""Import the three scripts as modules (their file names have hyphens).

    from load_scripts import load_script
    paged = load_script("paged")          # "naive", "paged" or "sharing"

Each script is executed once per process and cached in sys.modules (llama3_naive, llama3_paged,
llama3_paged_sharing). Importing a script runs no inference: each guards main() with `if __name__ == "__main__"`.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"naive": "llama3-naive.py", "paged": "llama3-paged.py", "sharing": "llama3-paged-sharing.py"}


def load_script(name):
    module_name = SCRIPTS[name].removesuffix(".py").replace("-", "_")
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / SCRIPTS[name])
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # before exec: dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[module_name]

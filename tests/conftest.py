import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random-weight Llama 3 checkpoint in Meta's format, with the genuine tokenizer (~35 MB, ~1 s)."""
    import make_checkpoint
    out = tmp_path_factory.mktemp("tiny")
    make_checkpoint.write_checkpoint(str(out), preset="tiny", seed=0)
    return out


def run_script(script, *args, timeout=300):
    """Run llama3-naive.py or llama3-paged.py as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)

"""Fixtures and helpers shared by the tests, and a time limit on every test, so that a hang fails."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
TEST_TIMEOUT_SECONDS = 120  # per test; the slowest takes about 20 s on a 2-core CPU
# Tests that pin down the CPU path: explicit small block sizes, the CPU budget, the PyTorch kernel. On a GPU with
# flash-attn the scripts use its kernel, which takes blocks of 256 and up only, and the budget is the GPU's.
cpu_path_only = pytest.mark.skipif(torch.cuda.is_available(), reason="pins the CPU path (PyTorch kernel, CPU budget)")


def pin_cpu_path(monkeypatch, *modules):
    """Run the scripts' code in process as on a CPU, whatever the machine: CPU tensors, float32, attention_torch.
    (On a CPU this changes nothing.)"""
    for module in modules:
        for name, value in (("DEVICE", torch.device("cpu")), ("DTYPE", torch.float32),
                            ("attention", module.attention_torch), ("KERNEL", "pytorch")):
            monkeypatch.setattr(module, name, value)


def pytest_addoption(parser):
    parser.addoption("--script", metavar="PATH", help="tests/test_exercise.py grades this copy of llama3-paged.py "
                     "(yours, from python tools/exercise.py) instead; relative to the current directory")


def pytest_configure(config):
    script = config.getoption("script", None)
    if script is not None and not Path(script).is_file():
        raise pytest.UsageError(f"--script {script}: no such file (python tools/exercise.py writes my-llama3-paged.py)")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_SECONDS))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tensors here are tiny: more torch threads only add overhead, a lot of it when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the scripts run as subprocesses
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A random-weight Llama 3 checkpoint in Meta's format, with the genuine tokenizer (~35 MB, ~1 s)."""
    import make_checkpoint
    out = tmp_path_factory.mktemp("tiny")
    make_checkpoint.write_checkpoint(str(out), preset="tiny", seed=0)
    return out


def run_script(script, *args, timeout=TEST_TIMEOUT_SECONDS):
    """Run one of the three scripts as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)

"""tools/animate.py: the scene it draws by default tells the whole story (a request waits for blocks, one is
preempted and recomputed, every block comes back at the end), its frames draw, and bad arguments get one line."""
import subprocess
import sys

import pytest

import animate
from conftest import ROOT


@pytest.fixture(scope="module")
def default_scene(tmp_path_factory):
    args = animate.parse_args(["--out", str(tmp_path_factory.mktemp("animation") / "pool.gif")])
    return args, animate.build_scene(args)


def test_default_scene_waits_preempts_recomputes_and_frees_every_block(default_scene):
    args, scene = default_scene
    last = scene["last_step"]
    status = {step: animate.paged_status(scene, step) for step in range(1, last + 2)}
    # At the first decode step some requests run and at least one waits for blocks: not only after a preemption.
    assert {"running", "waiting"} <= set(status[1].values())
    # One is preempted, and later comes back with more tokens than its prompt: its prompt and what it had generated,
    # recomputed in one prefill. It then runs to its end.
    events = scene["events"]
    preempted = [(step, req_id) for step, kind, req_id, _ in events if kind == "preempted"]
    assert preempted and scene["preemptions"] == len(preempted)
    for step, req_id in preempted:
        assert status[step + 1][req_id] == "waiting"
        back = [(s, n) for s, kind, r, n in events if kind == "recomputed" and r == req_id and s > step]
        assert back and back[0][1] > scene["lengths"][req_id][0]
        assert status[back[0][0] + 1][req_id] == "running"
    # The end: every request done, and every block back in the free list, as the frame after the last step shows.
    assert set(status[last + 1].values()) == {"done"}
    assert scene["free_at_end"] == scene["num_blocks"] and scene["held"][last + 1] == {}
    # The frames include the first step, the steps after the preemption and the recompute, and that end.
    steps = animate.frame_steps(scene, args.every)
    assert steps[0] == 1 and steps[-1] == last + 1
    assert all(s + 1 in steps for s, kind, _, _ in events if kind in ("preempted", "recomputed"))
    # The naive cache, in the same budget, holds 2 rows, and needs more decode steps for the same requests.
    assert args.budget_tokens // args.max_seq_len == 2 and len(scene["naive"]) > last


def test_two_frames_draw(default_scene, tmp_path):
    from PIL import Image
    args, scene = default_scene
    out = tmp_path / "two.gif"
    assert animate.write_gif(scene, [1, scene["last_step"] + 1], args, out) == 2
    with Image.open(out) as gif:
        assert gif.n_frames == 2 and gif.size[0] == 800


@pytest.mark.parametrize("argv, message", [
    (["--n", "abc"], "invalid int value"),
    (["--block-size", "0"], "--block-size must be positive"),
    (["--n", "13"], "at most 12 requests"),
    (["--max-seq-len", "1000"], "must be a multiple of --block-size"),
    (["--budget-tokens", "512"], "at least one naive row"),
    (["--out", "pool.png"], "must name a .gif file"),
    (["--first", "995"], "prompts"),  # past the end of the shipped 1000
])
def test_bad_arguments_get_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        animate.main(argv + (["--out", str(tmp_path / "x.gif")] if "--out" not in argv else []))
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_bad_argument_from_the_command_line():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "animate.py"), "--every", "0"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == "animate.py: error: --every must be positive, got 0"

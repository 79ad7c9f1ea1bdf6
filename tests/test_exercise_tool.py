"""tools/exercise.py: the copy it writes (llama3-paged.py with holes, found in the syntax tree) and its command line.
tests/test_exercise.py grades what goes in the holes."""
import ast
import re
import subprocess
import sys

import pytest

import exercise
from conftest import ROOT

TOOL = ROOT / "tools" / "exercise.py"
PAGED = ROOT / "llama3-paged.py"
METHODS = ["blocks_for", "can_allocate", "allocate", "needs_block", "append_block", "free", "block_tables"]


def run_tool(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("exercise.py: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def definitions(source):
    """Top-level functions and classes, and the manager's methods, by name: their nodes."""
    tree = ast.parse(source)
    nodes = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    nodes.update({f"KVCacheManager.{node.name}": node for node in nodes["KVCacheManager"].body
                  if isinstance(node, ast.FunctionDef)})
    return nodes


def is_hole(statement):
    return isinstance(statement, ast.Raise) and isinstance(statement.exc, ast.Call) and \
        statement.exc.func.id == "NotImplementedError"


def test_the_copy_has_holes_in_the_manager_and_the_loop_and_nothing_else_changed(tmp_path):
    result = run_tool(tmp_path / "mine.py")
    assert result.returncode == 0 and result.stdout.count("\n") == 1 and "9 holes" in result.stdout, result
    original, copy = definitions(PAGED.read_text()), definitions((tmp_path / "mine.py").read_text())
    assert original.keys() == copy.keys()
    for name in METHODS:  # the docstring, if any, then one raise with a hint
        method, body = original[f"KVCacheManager.{name}"], copy[f"KVCacheManager.{name}"].body
        docstring = ast.get_docstring(method)
        assert ast.get_docstring(copy[f"KVCacheManager.{name}"]) == docstring
        assert len(body) == 1 + bool(docstring) and is_hole(body[-1]), name
        assert len(body[-1].exc.args[0].value) > 40, f"{name}: a hint in words"
    changed = {name for name in original if ast.dump(original[name]) != ast.dump(copy[name])}
    assert changed == {"KVCacheManager", "generate"} | {f"KVCacheManager.{name}" for name in METHODS}
    # generate(): the grow and free steps are each one raise; every other simple statement is the original's.
    loop = next(node for node in ast.walk(copy["generate"]) if isinstance(node, ast.While))
    holes = [s for s in loop.body if is_hole(s)]
    assert [h.exc.args[0].value.split(",")[0] for h in holes] == ["step 1", "step 5"]
    simple = lambda tree: [ast.dump(s) for s in ast.walk(tree) if isinstance(s, ast.stmt) and not hasattr(s, "body")]
    assert set(simple(copy["generate"])) - set(simple(original["generate"])) == {ast.dump(h) for h in holes}
    source = (tmp_path / "mine.py").read_text()
    steps = re.findall(r"# \d\. \w+", PAGED.read_text())  # the loop's numbered comments, all kept
    assert len(steps) == 5 and all(step in source for step in steps) and "manager.free(" not in source


def test_the_blank_copy_shows_its_help_and_fails_with_a_hint(tmp_path, tiny_ckpt):
    blank = tmp_path / "blank.py"
    assert run_tool(blank).returncode == 0
    shown = subprocess.run([sys.executable, str(blank), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--block-size" in shown.stdout, shown.stderr
    ran = subprocess.run([sys.executable, str(blank), "2", "--ckpt-dir", str(tiny_ckpt), "--prompts",
                          str(ROOT / "sharegpt-filtered.json"), "--max-seq-len", "160", "--ref-lengths", "--quiet"],
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode == 1 and ran.stderr.strip().splitlines()[-1].startswith("NotImplementedError: step 1, grow:")


def test_it_refuses_to_overwrite_a_file_unless_forced(tmp_path):
    mine = tmp_path / "my-llama3-paged.py"
    mine.write_text("# my work\n")
    refused = run_tool(mine)
    assert "exists" in one_line_error(refused) and "--force" in refused.stderr
    assert mine.read_text() == "# my work\n"
    assert run_tool(cwd=tmp_path).returncode == 1 and mine.read_text() == "# my work\n"  # the default name, here
    forced = run_tool(mine, "--force")
    assert forced.returncode == 0 and "raise NotImplementedError(" in mine.read_text()


@pytest.mark.parametrize("where,message", [
    ("a-folder", "cannot write"),                  # an existing folder
    ("a-file/mine.py", "cannot write"),            # under a file
    (PAGED, "exists"),                             # the script itself, not forced
])
def test_bad_paths_get_one_line(tmp_path, where, message):
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "a-file").write_text("")
    assert message in one_line_error(run_tool(tmp_path / where))


def test_it_never_writes_over_the_scripts_and_bad_arguments_get_one_line():
    assert "one of the three scripts" in one_line_error(run_tool(PAGED, "--force"))
    assert "unrecognized arguments" in one_line_error(run_tool("a.py", "b.py"))
    assert "unrecognized arguments" in one_line_error(run_tool("--overwrite"))


def test_the_holes_follow_llama3_paged_as_it_changes():
    """Lines and comments added anywhere, even between a docstring and the code, move no hole and leak no code."""
    source = PAGED.read_text()
    moved = source.replace('"""Hands out the blocks', '# a new comment\n\n    """Hands out the blocks')
    moved = moved.replace("        block = self.free_blocks.popleft()\n",
                          "        # take the oldest free block\n        block = self.free_blocks.popleft()\n")
    moved = moved.replace("        # 5. Free", "        pass  # a new statement before step 5\n        # 5. Free")
    moved = "import os  # new\n" + moved
    assert moved.count("# take the oldest") == 1 and moved.count("a new statement") == 1
    text = exercise.exercise_source(moved, "mine.py")
    assert text.count("raise NotImplementedError(") == 9
    assert "self.free_blocks.popleft" not in text and "take the oldest" not in text
    assert "pass  # a new statement before step 5" in text and "# a new comment" in text


def test_a_script_without_a_step_comment_gets_one_line(capsys):
    source = PAGED.read_text().replace("# 5. Free", "# 5. Release")
    with pytest.raises(SystemExit) as exit_:
        exercise.exercise_source(source, "mine.py")
    assert exit_.value.code == 1 and "'# 5. Free'" in capsys.readouterr().err

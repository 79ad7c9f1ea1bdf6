"""Write the exercise: a copy of llama3-paged.py with its paged cache taken out, to build again and grade.

    python tools/exercise.py                  # writes my-llama3-paged.py
    python -m pytest tests/test_exercise.py --script my-llama3-paged.py

The copy is llama3-paged.py as it is now, but the bodies of KVCacheManager's methods (all but __init__; their
docstrings stay) and the code of the generation loop's grow and free steps (their numbered comments stay) are
each one line: raise NotImplementedError with a hint. Everything else (the model, the kernel, admission,
prefill, decode, the report) is there and works. Fill in the holes in the order of the tests, which the copy's
first lines give: blocks_for, can_allocate, needs_block, append_block, allocate (which takes its blocks with
append_block), free, block_tables, then the two steps of the loop. Each test says what it expected; without
--script the same tests grade the shipped llama3-paged.py.

The holes are found in llama3-paged.py's syntax tree (the class, its methods, the loop's "# 1. Grow",
"# 2. Admit" and "# 5. Free" comments), so the copy follows the script as it changes.
"""
import ast
import json
import re
import textwrap
from pathlib import Path

from cli import ArgumentParser, check_out, fail, run_main
from scripts import SCRIPTS

SOURCE = SCRIPTS["paged"]
DEFAULT_OUT = "my-llama3-paged.py"

# One hint per hole, in the order the tests take them (each test needs only the holes before it).
METHOD_HINTS = {
    "blocks_for": "return how many blocks num_tokens tokens take: num_tokens / block_size, rounded up",
    "can_allocate": "return True if enough blocks are free to hold a new request's num_tokens tokens",
    "needs_block": "return True if num_tokens tokens no longer fit in the blocks request req_id holds",
    "append_block": "take a free block, put it at the end of request req_id's blocks, and note in "
                    "new_entries[(row, column)] where block_tables must write it",
    "allocate": "give request req_id the blocks that num_tokens tokens take, one append_block each, "
                "then return its row of the block table: its id",
    "free": "put all of request req_id's blocks back in free_blocks, and forget the request",
    "block_tables": "write new_entries into self.block_table, then clear new_entries (each block handed out is "
                    "written once, not again at every call), and return its first width columns for the given "
                    "rows, in their order",
}
# The loop's steps: the comment that starts each, the comment that ends it (None: the end of the loop), its hint,
# and the names the hint mentions (each must be in the step's code, so that the hint stays true).
STEPS = [
    ("# 1. Grow", "# 2. Admit", "step 1, grow: every running request r for which manager.needs_block(r.id, "
     "len(r.tokens)) gets append_block. Count len(r.tokens), not + 1: the newest token is not cached yet, and this "
     "step's decode writes its K and V at position len(r.tokens) - 1, so r needs room for len(r.tokens) tokens (the "
     "+ 1 of step 2 is for the token a prefill adds first). While too few blocks are free, preempt the newest "
     "running request: free it, put it back at the head of waiting, count stats['preemptions']",
     ("needs_block", "append_block", "len", "tokens", "waiting", "running", "preemptions")),
    ("# 5. Free", None, "step 5, free: give back the blocks of every finished request (req.done), and keep only "
     "the unfinished ones in running", ("running",)),
]
EXERCISE_HEADER = ("# The exercise: llama3-paged.py with its paged cache taken out, written by tools/exercise.py.\n"
                   "# Replace each raise NotImplementedError in the order of the tests: KVCacheManager's\n"
                   f"# {', '.join(METHOD_HINTS)}, then generate()'s steps 1 and 5.\n"
                   "# Grade it with\n"
                   "#     python -m pytest tests/test_exercise.py --script {path}\n")


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default=DEFAULT_OUT, help=f"file to write (default: {DEFAULT_OUT})")
    p.add_argument("--force", action="store_true", help="overwrite the file if it exists")
    args = p.parse_args(argv)
    check_out(args.out)
    if Path(args.out).exists() and not args.force:
        fail(f"{args.out} exists and may hold your work: pass --force to overwrite it")
    if Path(args.out).resolve() in {path.resolve() for path in SCRIPTS.values()}:
        fail(f"{args.out} is one of the three scripts: write the exercise to another file")
    return args


def comment_line(lines, text, first, last):
    """The line number (1-based) of the first line from `first` to `last` that starts with the comment `text`."""
    for number in range(first, last + 1):
        if lines[number - 1].lstrip().startswith(text):
            return number
    fail(f"{SOURCE.name} has no {text!r} comment in generate(): the exercise cannot find that step")


def with_trailing_comments(lines, end, indent, limit=None):
    """Extend a hole ending at line `end` over the comment lines right after it (before line `limit`) that are
    indented deeper than `indent`: they belong to the code taken out. Blank lines stay."""
    last = end
    for number in range(end + 1, min(limit or len(lines) + 1, len(lines) + 1)):
        line = lines[number - 1]
        if not line.strip():
            continue
        if not line.lstrip().startswith("#") or len(line) - len(line.lstrip()) <= indent:
            break
        last = number
    return last


def raise_lines(indent, hint, width=120):
    """`raise NotImplementedError("hint")` at `indent`, the hint cut into string literals to stay within width."""
    head = " " * indent + "raise NotImplementedError("
    chunks = textwrap.wrap(hint, width - len(head) - 4, break_long_words=False, break_on_hyphens=False)
    literals = [json.dumps(chunk + " ") for chunk in chunks[:-1]] + [json.dumps(chunks[-1]) + ")"]
    return [head + literals[0]] + [" " * len(head) + literal for literal in literals[1:]]


def method_holes(tree, lines):
    """(first line, last line, indent, hint) for the body of each KVCacheManager method but __init__."""
    manager = next((node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "KVCacheManager"),
                   None)
    if manager is None:
        fail(f"{SOURCE.name} has no class KVCacheManager")
    methods = {node.name: node for node in manager.body if isinstance(node, ast.FunctionDef)}
    holes = []
    for name, hint in METHOD_HINTS.items():
        method = methods.get(name)
        if method is None:
            fail(f"{SOURCE.name}'s KVCacheManager has no method {name}")
        body = method.body
        has_docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
            isinstance(body[0].value.value, str)
        if body[0].lineno == method.lineno:
            fail(f"{SOURCE.name}: KVCacheManager.{name} has its body on the line of its def")
        if has_docstring:
            if len(body) == 1:
                fail(f"{SOURCE.name}: KVCacheManager.{name} has only a docstring")
            first = body[0].end_lineno + 1
        else:  # the hole starts after the def line(s): just above the first statement, or its comments
            header = [node for part in (method.args, method.returns) if part for node in ast.walk(part)]
            header_end = max([method.lineno] + [node.end_lineno for node in header if hasattr(node, "end_lineno")])
            first = body[0].lineno
            while first - 1 > header_end and lines[first - 2].lstrip().startswith("#"):
                first -= 1
        last = with_trailing_comments(lines, body[-1].end_lineno, method.col_offset)
        holes.append((first, last, body[-1].col_offset, hint))
    return holes


def is_timing(statement):
    """`start = time.perf_counter()` or `stats["manager_seconds"] += ...`: the manager's clock, kept around a hole."""
    source = ast.unparse(statement)
    return bool(re.fullmatch(r"start = time\.perf_counter\(\)", source)) or \
        source.startswith("stats['manager_seconds'] +=")


def step_holes(tree, lines):
    """(first line, last line, indent, hint) for the code of the loop's grow and free steps."""
    generate = next((node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "generate"), None)
    if generate is None:
        fail(f"{SOURCE.name} has no function generate")
    loops = [node for node in ast.walk(generate) if isinstance(node, ast.While)]
    holes = []
    for start_comment, end_comment, hint, names in STEPS:
        begin = comment_line(lines, start_comment, generate.lineno, generate.end_lineno)
        loop = next((loop for loop in loops if loop.body[0].lineno < begin <= loop.end_lineno), None)
        if loop is None:
            fail(f"{SOURCE.name}: the {start_comment!r} comment is not inside generate()'s loop")
        end = comment_line(lines, end_comment, begin, loop.end_lineno) if end_comment else loop.end_lineno + 1
        step = [s for s in loop.body if begin < s.lineno and s.end_lineno < end]
        while step and is_timing(step[0]):
            step.pop(0)
        while step and is_timing(step[-1]):
            step.pop()
        if not step:
            fail(f"{SOURCE.name}: no code after the {start_comment!r} comment in generate()")
        code = "\n".join(ast.unparse(s) for s in step)
        missing = [name for name in names if not re.search(rf"\b{name}\b", code)]
        if missing:
            fail(f"{SOURCE.name}: the {start_comment!r} step no longer uses {', '.join(missing)}, "
                 f"which the exercise's hint names")
        last = with_trailing_comments(lines, step[-1].end_lineno, step[0].col_offset, end)
        holes.append((step[0].lineno, last, step[0].col_offset, hint))
    return holes


def exercise_source(source, out_name):
    """The text of the exercise: `source` (llama3-paged.py's text) with every hole one raise NotImplementedError."""
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        fail(f"cannot parse {SOURCE.name}: {e.msg} (line {e.lineno})")
    lines = source.splitlines()
    holes = sorted(method_holes(tree, lines) + step_holes(tree, lines))
    for (_, last, _, _), (first, _, _, _) in zip(holes, holes[1:]):
        if first <= last:
            fail(f"{SOURCE.name}: two pieces of the exercise overlap at line {first}")
    for first, last, indent, hint in reversed(holes):
        lines[first - 1:last] = raise_lines(indent, hint)
    at = 1 if lines and lines[0].startswith("#!") else 0
    lines[at:at] = EXERCISE_HEADER.format(path=out_name).splitlines()
    text = "\n".join(lines) + "\n"
    try:
        compile(text, out_name, "exec")
    except SyntaxError as e:  # a bug here, or a shape of llama3-paged.py this tool does not expect
        fail(f"the exercise made from {SOURCE.name} does not compile: {e.msg} (line {e.lineno})")
    return text


def main(argv=None):
    args = parse_args(argv)
    try:
        source = SOURCE.read_text(encoding="utf-8")
    except OSError as e:
        fail(f"cannot read {SOURCE}: {e.strerror}")
    text = exercise_source(source, args.out)
    try:
        Path(args.out).write_text(text, encoding="utf-8")
    except OSError as e:
        fail(f"cannot write {args.out}: {e.strerror or e}")
    holes = text.count("raise NotImplementedError(")
    print(f"wrote {args.out}: {holes} holes to fill, graded by "
          f"python -m pytest tests/test_exercise.py --script {args.out}")


if __name__ == "__main__":
    run_main(main)

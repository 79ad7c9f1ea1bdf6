"""The scripts share their tokenizer, model, report and argument checks word for word, so that `diff`
between neighbours shows one lesson and little else. These tests fail when a shared part drifts in one file."""
import ast
from functools import cache

import pytest

from conftest import ROOT

SCRIPTS = ["llama3-naive.py", "llama3-paged.py", "llama3-paged-swap.py", "llama3-paged-prefix.py",
           "llama3-paged-samples.py", "llama3-paged-beams.py"]
# Top-level definitions identical in all the scripts.
SHARED = ["DEVICE", "CPU_KV_BUDGET_TOKENS", "fail", "SPLIT_PATTERN", "SPECIAL_NAMES", "load_tokenizer", "encode_chat",
          "load_prompts", "load_model", "rope_tables", "rms_norm", "apply_rope", "forward", "ATTENTION_CHUNK", "attend",
          "choose_kernel", "attention", "check_kernel", "append_token", "gpu_budget_tokens", "allocate_kv",
          "batch_inputs", "record_memory", "report", "import flash_attn"]


@cache  # each script parsed once for all the tests
def definitions(script):
    """name -> source text of each top-level def, class and assignment (the kernel choice is named `attention`)."""
    source = (ROOT / script).read_text()
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            found[node.name] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Try):  # the import of flash-attn, and what a failed one leaves
            found["import flash_attn"] = ast.get_source_segment(source, node)
        elif isinstance(node, ast.Assign):  # NAME = ..., or attention, KERNEL, DTYPE = choose_kernel(...)
            target = node.targets[0]
            name = target.id if isinstance(target, ast.Name) else ast.unparse(target.elts[0])
            found[name] = ast.get_source_segment(source, node)
    return found


@pytest.mark.parametrize("name", SHARED)
def test_shared_parts_are_identical_in_all_scripts(name):
    texts = {script: definitions(script).get(name) for script in SCRIPTS}
    assert all(texts.values()), f"{name} is missing from {[s for s, t in texts.items() if not t]}"
    for script in SCRIPTS[1:]:
        assert texts[script] == texts[SCRIPTS[0]], f"{name} differs between {SCRIPTS[0]} and {script}"


def test_the_paged_scripts_read_the_block_table_alike():
    """attention_torch reads its script's cache layout: naive's its rows, the paged scripts' the block table."""
    for script in SCRIPTS[2:]:
        assert definitions(SCRIPTS[1])["attention_torch"] == definitions(script)["attention_torch"], script
    naive, paged = definitions(SCRIPTS[0])["attention_torch"], definitions(SCRIPTS[1])["attention_torch"]
    assert "cache_batch_idx.long()" in naive and "block_table" not in naive.split('"""')[-1]
    assert "block_table[start:end" in paged and "cache_batch_idx" not in paged.split('"""')[-1]


def test_request_is_identical_in_naive_and_paged():
    """(llama3-paged-beams.py's requests also carry a beam's score and root.) The swap, prefix and samples rungs
    need no more."""
    for script in (SCRIPTS[1], "llama3-paged-swap.py", "llama3-paged-prefix.py", "llama3-paged-samples.py"):
        assert definitions(SCRIPTS[0])["Request"] == definitions(script)["Request"], script


def test_argument_checks_are_shared():
    """Every line of llama3-naive.py's parse_args (its options, help and checks) is in the others', in order:
    the paged scripts only add options."""
    naive = definitions(SCRIPTS[0])["parse_args"].splitlines()
    for script in SCRIPTS[1:]:
        lines = iter(definitions(script)["parse_args"].splitlines())
        missing = [line for line in naive if line.strip() != "args = p.parse_args(argv)" and line not in lines]
        assert not missing, f"{script}'s parse_args lacks, or reorders, naive's lines: {missing}"


def test_the_kernel_is_called_by_name_where_attention_happens():
    for script in SCRIPTS:
        forward = definitions(script)["forward"]
        assert "out = attention(q, kv_cache[0][i], kv_cache[1][i], k, v, cache_seqlens=cache_seqlens," in forward
        assert "attention, KERNEL, DTYPE = choose_kernel(flash_attn_with_kvcache," in definitions(script)["attention"]

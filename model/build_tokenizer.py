"""Builds the shipped model's tokenizer offline: a byte-level BPE trained with `tokenizers` on
text from the task generators (evals/tasks.py) plus docstrings of the Python standard library
(English prose and code that ships with every Python, so ordinary text does not fall apart
into single bytes).

Choices, and why:
- Byte-level BPE (the GPT-2 / Llama-3 scheme): every string round-trips, no <unk>.
- Digits are split into single tokens before BPE (Digits(individual_digits=True)), so a
  number is always spelled digit by digit: recall then means copying digits one at a time,
  and no merge can glue a number to its neighbours in one context and not in another.
- Special tokens: <s> (bos, id 0), </s> (eos, id 1), <pad> (id 2). The post-processor puts <s>
  in front of every encoded text (as Llama's tokenizers do); decode(skip_special_tokens=True)
  drops it again.
- Vocabulary 2048: the task text needs few merges, and a small embedding keeps the
  checkpoint small.

Usage: python model/build_tokenizer.py [--out model/absorber-tiny] [--vocab 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # evals/ lives beside model/
from evals.tasks import TASKS, make_example  # noqa: E402

SPECIALS = ["<s>", "</s>", "<pad>"]
HERE = Path(__file__).resolve().parent


class _CharCount:
    """Length proxy for the generators before any tokenizer exists (~4 characters a token)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [0] * (len(text) // 4)


def task_text(n_examples: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n_examples):
        ex = make_example(TASKS[i % len(TASKS)], rng.randint(64, 1024), _CharCount(), seed * 1_000_003 + i)
        out.append(ex.context + ex.query + " " + ", ".join(ex.answers) + "\n" + ex.target)
    return out


def stdlib_docstrings(max_chars: int) -> list[str]:
    """Docstrings of the standard library, read with ast (never imported: no side effects)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
                    total += len(doc)
                    if total >= max_chars:
                        return out
    return out


def build(vocab_size: int = 2048, seed: int = 0, n_examples: int = 3000, doc_chars: int = 1_500_000) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,  # ids 0, 1, 2 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(task_text(n_examples, seed) + stdlib_docstrings(doc_chars), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def save(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "absorber-tiny")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-max-length", type=int, default=2048)
    args = ap.parse_args()
    tok = build(args.vocab, args.seed)
    save(tok, args.out, args.model_max_length)
    print(f"saved tokenizer ({tok.get_vocab_size()} tokens) to {args.out}")


if __name__ == "__main__":
    main()

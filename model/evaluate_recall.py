"""In-context recall of a causal LM on the retrieval tasks of evals/tasks.py, greedy decoding.

Each example is prompted with its full context (``<s>`` + context + query) and the model
decodes greedily until a newline or ``</s>``; ``evals.tasks.score`` grades the answer.
Evaluation seeds are 0..N-1; training (model/train.py) draws its seeds from 10**6 upwards,
so evaluation examples are never training examples.

Usage: python model/evaluate_recall.py [--model model/absorber-tiny] [--n 100] [--n-tokens 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))      # evals/ lives beside model/
from absorber_engine.hf_cache import cache_keyword, returned_cache  # noqa: E402
from evals.tasks import RETRIEVAL_TASKS, Example, make_example, score  # noqa: E402

HERE = Path(__file__).resolve().parent


def stop_ids(tokenizer) -> set[int]:
    """</s> and every token that contains a newline: an answer ends at the end of its line."""
    ids = {i for tok, i in tokenizer.get_vocab().items() if "\n" in tokenizer.convert_tokens_to_string([tok])}
    return ids | {tokenizer.eos_token_id}


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding with the KV cache, batch 1; returns the new ids without the stop token."""
    out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(out.logits[0, -1].argmax())
        if nxt in stop:
            break
        new.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), use_cache=True, **{cache_keyword(model): returned_cache(out)})
    return new


def answer_example(model, tokenizer, ex: Example, stop: set[int]) -> str:
    prompt = tokenizer.encode(ex.context + ex.query)  # <s> is prepended by the tokenizer
    budget = len(tokenizer.encode(" " + ", ".join(ex.answers), add_special_tokens=False)) + 4
    return tokenizer.decode(greedy(model, prompt, budget, stop), skip_special_tokens=True)


def evaluate(model, tokenizer, tasks=RETRIEVAL_TASKS, n: int = 100, n_tokens: int = 512, seed0: int = 0, verbose: bool = False) -> dict[str, float]:
    """Mean score per task over seeds seed0 .. seed0+n-1."""
    model.eval()
    stop = stop_ids(tokenizer)
    result = {}
    for task in tasks:
        total = 0.0
        for seed in range(seed0, seed0 + n):
            ex = make_example(task, n_tokens, tokenizer, seed)
            got = answer_example(model, tokenizer, ex, stop)
            s = score(ex, got)
            total += s
            if verbose and s < 1:
                print(f"  miss {task} seed {seed}: expected {ex.answers} got {got!r}")
        result[task] = total / n
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=HERE / "absorber-tiny")
    ap.add_argument("--n", type=int, default=100, help="examples per task")
    ap.add_argument("--n-tokens", type=int, default=512, help="context + query length")
    ap.add_argument("--tasks", nargs="*", default=list(RETRIEVAL_TASKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--verbose", action="store_true", help="print every miss")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.time()
    res = evaluate(model, tok, args.tasks, args.n, args.n_tokens, verbose=args.verbose)
    print(f"in-context recall, greedy, {args.n} examples per task, {args.n_tokens} tokens (context + query):")
    for task, acc in res.items():
        print(f"  {task:16s} {100 * acc:6.1f}%")
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

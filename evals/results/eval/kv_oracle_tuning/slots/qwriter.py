"""Fine-tune the shipped tiny model so its questions name keys of its context: the key's first
mention in each kv_recall question counts as answer tokens (copied from the context)."""
import sys, os, time, random, argparse, re, json
os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 5)
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "model"))
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import train as T
from evals.tasks import make_example
from transformers import AutoTokenizer, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=300)
ap.add_argument("--lr", type=float, default=3e-4)
ap.add_argument("--out", required=True, help="a folder for the fine-tuned model (outside the repository)")
a = ap.parse_args()
SRC = os.path.join(ROOT, "model", "absorber-tiny")
tok = AutoTokenizer.from_pretrained(SRC)
model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
_orig = T.make_sequence

def make_sequence(task, n_tokens, tok, seed, rng, n_queries, bos):
    if task != "kv_recall":
        return _orig(task, n_tokens, tok, seed, rng, n_queries, bos)
    ex = make_example(task, n_tokens, tok, seed, n_queries=n_queries)
    text, spans = ex.context, []
    for query, answers in [(ex.query, ex.answers)] + ex.more:
        q0 = query.index('"')                       # the key's first mention, its closing quote included
        spans.append((len(text) + q0 + 1, len(text) + query.index('"', q0 + 1) + 1))
        text += query
        line = " " + ", ".join(answers) + "\n"
        spans.append((len(text), len(text) + len(line)))
        text += line
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"]) + [tok.eos_token_id]
    ans = [any(s < b and a_ < e for a_, b in spans) for s, e in enc["offset_mapping"]] + [False]
    if bos:
        ids, ans = [tok.bos_token_id] + ids, [False] + ans
    return ids, ans
T.make_sequence = make_sequence

cfg = T.TrainConfig(seed=7, start_ctx=512, copy_start=T.MIXTURE["copy"][0])
step = 0
gen = T.batches(cfg, tok, lambda: step / a.steps)
opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
t0 = time.time(); ema = None
model.train()
for ids, ans, att, is_copy in gen:
    lr = a.lr * min(1.0, (step + 1) / 20)
    for g in opt.param_groups: g["lr"] = lr
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=att).logits
    ce = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    valid = att[:, 1:].reshape(-1).bool(); is_ans = ans[:, 1:].reshape(-1) & valid
    loss = ce[is_ans].mean() + cfg.lm_weight * ce[valid].mean()
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()
    ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
    step += 1
    if step % 25 == 0:
        print(f"step {step} loss {ema:.3f} ans {ce[is_ans].mean().item():.3f} {time.time()-t0:.0f}s", flush=True)
model.eval()
model.save_pretrained(a.out); tok.save_pretrained(a.out)
for f in ("absorber_config.json", "generation_config.json"):
    import shutil; shutil.copy(os.path.join(SRC, f), os.path.join(a.out, f))
print("saved", a.out, f"{time.time()-t0:.0f}s")

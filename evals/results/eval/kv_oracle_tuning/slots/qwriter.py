"""Fine-tune the shipped tiny model so its questions name keys of its context: the key's first
mention in each kv_recall question counts as answer tokens (copied from the context)."""
import sys, os, time, random, argparse, re, json, itertools
os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), *[".."] * 5)
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "model"))
import torch, torch.nn.functional as F
torch.set_num_threads(1)
import train as T
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

ASK = re.compile(r'What is the value of "([^"\n]+")')


def make_sequence(task, n_tokens, tok, seed, rng, n_queries, bos):
    """train.make_sequence, with each kv_recall question's first mention of its key (the closing
    quote included) counted as answer tokens too."""
    ids, ans = _orig(task, n_tokens, tok, seed, rng, n_queries, bos)
    if task != "kv_recall":
        return ids, ans
    pieces = [tok.decode([t]) for t in ids]
    ends = list(itertools.accumulate(len(p) for p in pieces))
    spans = [m.span(1) for m in ASK.finditer("".join(pieces))]
    return ids, [a_ or any(s < e and e - len(p) < b for s, b in spans) for a_, p, e in zip(ans, pieces, ends)]


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

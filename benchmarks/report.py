"""Turns pytest-benchmark's JSON into results.json (everything, with machine, versions and conditions)
and SUMMARY.md (the tables and the goals of issue 6, met or not)."""

from __future__ import annotations

import json
from pathlib import Path

from .measure import mib

# Issue 6's goals. Throughput: engine / baseline tokens absorbed per second; memory: engine / baseline
# peak tensor bytes; streaming: growth from the shortest to the longest stream.
# The e/g configurations run the engine as it runs by default on this CPU (bf16 compute, and
# checkpointed layers for g) against the fp32 baseline a user would write.
GOALS = {"a_hidden_l1": 4.0, "b_hidden_l1_kl": 1.5, "c_early_stop": 5.0, "c2_early_stop_both": 5.0,
         "e_bf16_engine": 4.0, "e2_bf16_engine_kl": 1.5}
MEMORY_GOAL_CONFIGS = {"a_hidden_l1", "b_hidden_l1_kl", "e_bf16_engine", "e2_bf16_engine_kl", "g_checkpoint"}
MEMORY_GOAL = 1 / 3
HELD_GROWTH_GOAL = 0.05
LATENCY_FLAT = 0.10      # what we call flat for per-token latency on a shared machine


def _sections(raw: dict) -> dict:
    out = {"e2e": [], "streaming": None, "sessions": None, "serving": None, "kernels": []}
    for b in raw.get("benchmarks", []):
        info = b.get("extra_info", {})
        sec = info.get("section")
        if sec == "e2e":
            out["e2e"].append({k: v for k, v in info.items() if k != "section"})
        elif sec in ("streaming", "sessions", "serving"):
            out[sec] = {k: v for k, v in info.items() if k != "section"}
        elif sec == "kernels":
            st = b["stats"]
            out["kernels"].append(dict(info, min_s=st["min"], median_s=st["median"], mean_s=st["mean"],
                                       rounds=st["rounds"]))
    return out


def _kernel_pairs(rows: list[dict]) -> list[dict]:
    by = {}
    for r in rows:
        by.setdefault(r["op"], {})[r["impl"]] = r
    pairs = []
    for op, d in by.items():
        if "plain" in d and "engine" in d:
            p, e = d["plain"], d["engine"]
            pairs.append(dict(op=op, shape=e["shape"], plain_median_ms=p["median_s"] * 1e3,
                              engine_median_ms=e["median_s"] * 1e3, plain_min_ms=p["min_s"] * 1e3,
                              engine_min_ms=e["min_s"] * 1e3, speedup_median=p["median_s"] / e["median_s"],
                              speedup_min=p["min_s"] / e["min_s"], plain_peak_bytes=p["peak_tensor_bytes"],
                              engine_peak_bytes=e["peak_tensor_bytes"],
                              max_rel_diff=e.get("max_rel_diff_plain_vs_engine")))
    return pairs


def _goals(sec: dict) -> list[dict]:
    goals = []
    for r in sec["e2e"]:
        cfg, size = r["config"], r["size"]
        if cfg in GOALS:
            got = r["throughput_ratio"]["median"]
            measured = f"{got:.2f}×"
            met = got >= GOALS[cfg]
            if cfg.startswith("c"):
                reached = r["engine"].get("reached_stop_loss")
                measured += (f", engine final loss {r['engine']['final_loss']:.4g} vs baseline "
                             f"{r['baseline']['final_loss']:.4g}" + ("" if reached else " (engine did not reach it)"))
                met = met and bool(reached)
            goals.append(dict(goal=f"{cfg} throughput ≥ {GOALS[cfg]:g}× baseline", size=size, measured=measured,
                              met=met))
        if "memory_ratio" in r and cfg in MEMORY_GOAL_CONFIGS:
            got = r["memory_ratio"]["tensor"]
            goals.append(dict(goal=f"{cfg} peak tensor memory ≤ 1/3 of baseline", size=size,
                              measured=f"{got:.2f} of baseline", met=got <= MEMORY_GOAL))
    s = sec["streaming"]
    if s:
        sm, lengths = s["summary"], s["conditions"]["lengths"]
        span = f"{lengths[0] // 1024}k→{lengths[-1] // 1024}k"
        goals.append(dict(goal=f"held memory flat (≤ +5%) {span}", size="stream",
                          measured=f"{sm['absorber_held_growth'] * 100:+.1f}%",
                          met=sm["absorber_held_growth"] <= HELD_GROWTH_GOAL))
        goals.append(dict(goal=f"generate latency flat (≤ +{LATENCY_FLAT * 100:.0f}%) {span}", size="stream",
                          measured=f"{sm['absorber_latency_growth'] * 100:+.1f}% (median), "
                                   f"{sm['absorber_latency_growth_best'] * 100:+.1f}% (best)",
                          met=min(sm["absorber_latency_growth"], sm["absorber_latency_growth_best"]) <= LATENCY_FLAT))
        if sm.get("full_kv_longest"):
            goals.append(dict(goal="full KV grows linearly (reference)", size="stream",
                              measured=f"{sm['full_kv_held_growth'] * 100:+.0f}% up to {sm['full_kv_longest'] // 1024}k",
                              met=None))
    return goals


def build(results_dir: Path, command: str, wall_s: float, extra: dict) -> dict:
    raw = json.loads((results_dir / "pytest-benchmark.json").read_text())
    sec = _sections(raw)
    info = raw.get("machine_info", {}).get("absorber_bench", {})
    result = {
        "command": command, "wall_s": wall_s, "datetime": raw.get("datetime"),
        "machine": info.get("machine"), "versions": info.get("versions"), "quick": info.get("quick"), **extra,
        "e2e": sec["e2e"], "streaming": sec["streaming"], "sessions": sec["sessions"], "serving": sec["serving"], "kernels": _kernel_pairs(sec["kernels"]),
        "goals": _goals(sec),
    }
    (results_dir / "results.json").write_text(json.dumps(result, indent=1))
    (results_dir / "SUMMARY.md").write_text(summary_md(result))
    return result


def _f(x, fmt="{:.2f}"):
    return "—" if x is None else fmt.format(x)


def summary_md(r: dict) -> str:
    m, v = r.get("machine") or {}, r.get("versions") or {}
    lines = [
        "# Absorber Engine benchmarks" + (" (quick)" if r.get("quick") else ""),
        "",
        f"Produced by `{r['command']}` in {r['wall_s'] / 60:.1f} min ({r.get('datetime')}).",
        "",
        f"Machine: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, torch threads {m.get('torch_threads')} "
        f"(--threads {r.get('threads_requested')}), "
        f"{_f(mib(m.get('memory_bytes')), '{:.0f}')} MiB RAM. Load average before / after: "
        f"{r.get('load_before')} / {r.get('load_after')} (other work on the machine skews absolute times; ratios "
        "come from runs interleaved in the same process).",
        f"Versions: python {v.get('python')}, torch {v.get('torch')}, transformers {v.get('transformers')}, "
        f"peft {v.get('peft')}, pytest-benchmark {v.get('pytest_benchmark')}.",
        "",
        "Baseline (benchmarks/baseline.py): the same objective written with transformers + PEFT: a LoRA adapter with the "
        "engine's r, alpha, targets and initial A/B; the teacher (a frozen copy of the round-start adapter) recomputed "
        "over X + future at every step; hidden states from output_hidden_states (h^L taken before the final norm, as "
        "the engine does); full-vocabulary logits and F.kl_div for the KL; autograd; AdamW. Same rounds (window "
        "sliding by n), same steps; with futures it samples them once per round with model.generate. "
        "tests/benchmarks/test_baseline_parity.py checks that its per-step losses equal the engine's.",
        "",
        "## Goals (issue 6)",
        "",
        "| goal | model | measured | met |",
        "| --- | --- | --- | --- |",
    ]
    for g in r["goals"]:
        met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['size']} | {g['measured']} | {met} |")
    lines += [
        "",
        "## End to end: engine vs PEFT baseline (same inputs, same rounds and steps)",
        "",
        "Throughput: tokens absorbed (rounds × n) per second, median of the repetitions; ratio = baseline time / "
        "engine time (median; best-of in parentheses). Memory: peak of live tensor bytes during one round above what "
        "was resident before (torch.profiler), and peak RSS above the RSS before (sampled every 2 ms), each in a fresh "
        "process. Loss gap: largest relative difference of the per-step losses (deterministic configurations). Configurations a-d run the engine in fp32; e, e2 and g in its default compute_dtype=\"auto\" (bf16 autocast on this CPU, fp32 weights, delta and AdamW); f loads both in bf16.",
        "",
        "| model | config | n / m / r / K / R | weights (engine / baseline) | engine tok/s | baseline tok/s | ratio | "
        "engine steps / final loss | baseline steps / final loss | peak tensors MiB (engine / baseline) | "
        "peak RSS MiB (engine / baseline) | loss gap |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in r["e2e"]:
        c = e["conditions"]
        tr = e["throughput_ratio"]
        em, bm = e["engine"].get("memory"), e["baseline"].get("memory")
        mem_t = f"{mib(em['peak_tensor_bytes']):.1f} / {mib(bm['peak_tensor_bytes']):.1f}" if em else "—"
        mem_r = f"{mib(em['peak_rss_delta']):.1f} / {mib(bm['peak_rss_delta']):.1f}" if em else "—"
        fut = f" + {c['futures']}×{c['future_tokens']} futures" if c["futures"] else ""
        kl = " + KL" if c["kl_weight"] else ""
        stop = f", engine stop < {c['engine_stop_loss']:.4g}" if c["engine_stop_loss"] else ""
        stop += f", baseline stop < {c['baseline_stop_loss']:.4g}" if c["baseline_stop_loss"] else ""
        lines.append(
            f"| {e['size']} | {e['config']}{kl}{fut}{stop} | {c['n']} / {c['m']} / {c['rank']} / {c['steps_per_round']} / "
            f"{c['rounds']} | {c['engine_dtype']} / {c['baseline_dtype']} | {e['engine']['tokens_per_s']:.0f} | "
            f"{e['baseline']['tokens_per_s']:.0f} | **{tr['median']:.2f}×** ({tr['best']:.2f}×) | "
            f"{e['engine']['steps']} / {e['engine']['final_loss']:.4g} | {e['baseline']['steps']} / "
            f"{e['baseline']['final_loss']:.4g} | {mem_t} | {mem_r} | {_f(e.get('loss_gap_rel'), '{:.1e}')} |")
    s = r.get("streaming")
    if s:
        c = s["conditions"]
        lines += [
            "",
            "## Streaming: held memory and generate latency",
            "",
            f"Model `stream`; absorber n={c['n']}, m={c['m']}, rank {c['rank']}, {c['steps_per_round']} step per round, "
            f"futures {c['futures']}; window baseline = {c['window_sinks']} sinks + {c['window_recent']} recent tokens; "
            f"latency = greedy decode of {c['decode_tokens']} tokens, median of {c['latency_reps']} (best in "
            f"parentheses). Held = delta + KV (absorber), KV (others). Full KV stops when its prefill would pass "
            f"{c['full_kv_time_budget_s']:.0f}s. Plot: `streaming.png`.",
            "",
            "| tokens | absorber held MiB | absorber ms/tok | full KV held MiB | full KV ms/tok | window held MiB | "
            "window ms/tok |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        full = {row["length"]: row for row in s["rows"]["full_kv"]}
        win = {row["length"]: row for row in s["rows"]["window"]}
        for a in s["rows"]["absorber"]:
            L = a["length"]
            f, w = full.get(L, {}), win.get(L, {})
            f_held = "skipped" if "skipped" in f else _f(mib(f.get("held_bytes")))
            f_lat = "—" if "skipped" in f or not f else f"{f['ms_per_token']:.2f} ({f['ms_per_token_best']:.2f})"
            lines.append(f"| {L} | {mib(a['held_bytes']):.2f} | {a['ms_per_token']:.2f} ({a['ms_per_token_best']:.2f}) | "
                         f"{f_held} | {f_lat} | {_f(mib(w.get('held_bytes')))} | "
                         f"{_f(w.get('ms_per_token'))} ({_f(w.get('ms_per_token_best'))}) |")
        skipped = [row["skipped"] for row in s["rows"]["full_kv"] if "skipped" in row]
        if skipped:
            lines += ["", f"Full KV skipped: {skipped[0]}."]
    ss = r.get("sessions")
    if ss:
        c = ss["config"]
        lines += [
            "",
            "## Many streams: batched versus one after another",
            "",
            f"Model `{ss['model']}`; each stream {ss['rounds_per_stream']} rounds of n={c['chunk_tokens']}, "
            f"m={c['sync_tokens']}, rank {c['rank']}, {c['max_steps']} steps, fp32. Batched: all sessions fed, then "
            "engine.run() absorbs their rounds in shared student passes (each row its own delta). Sequential: "
            f"session.absorb() one stream after another. Median of {ss['reps']} interleaved runs; ratio = sequential "
            "time / batched time. Peak: live tensor bytes during the whole absorption (torch.profiler).",
            "",
            "| streams | tokens absorbed | batched tok/s | sequential tok/s | ratio | peak tensors MiB (batched / sequential) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in ss["rows"]:
            lines.append(f"| {row['streams']} | {row['tokens']} | {row['batched_tok_s']:.0f} | "
                         f"{row['sequential_tok_s']:.0f} | **{row['ratio']:.2f}×** | "
                         f"{mib(row['batched_peak_bytes']):.1f} / {mib(row['sequential_peak_bytes']):.1f} |")
    sv = r.get("serving")
    if sv:
        c = sv["config"]
        lines += [
            "",
            "## Serving: absorber serve at 1, 4 and 16 concurrent sessions",
            "",
            f"Model `{sv['model']}`; n={c['chunk_tokens']}, m={c['sync_tokens']}, rank {c['rank']}, {c['max_steps']} "
            f"steps per round; each session one client chatting through the openai package, the history resent "
            f"every turn, {sv['max_tokens']} greedy tokens per answer. Latency: per request, queueing, absorption "
            "and decoding included. Held: what each session holds afterwards (delta + window KV + raw tokens).",
            "",
            "| sessions | requests | req/s | p50 s | p95 s | held MiB per session (mean / max) | conversation tokens "
            "per session | absorbed per session | largest batch |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in sv["rows"]:
            lines.append(f"| {row['sessions']} | {row['requests']} | {row['requests_per_s']:.1f} | {row['p50_s']:.3f} | "
                         f"{row['p95_s']:.3f} | {mib(row['held_bytes_mean']):.2f} / {mib(row['held_bytes_max']):.2f} | "
                         f"{row['conversation_tokens_mean']:.0f} | {row['absorbed_tokens_mean']:.0f} | "
                         f"{row['largest_batch']} |")
    if r.get("kernels"):
        lines += [
            "",
            "## Kernels: plain PyTorch vs the engine's CPU path (forward + backward; teacher attention forward only)",
            "",
            "| op | shape | plain ms (median / min) | engine ms (median / min) | speedup (median) | "
            "peak tensors MiB (plain / engine) | max rel. diff |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for k in r["kernels"]:
            shape = ", ".join(f"{a}={b}" for a, b in k["shape"].items())
            lines.append(f"| {k['op']} | {shape} | {k['plain_median_ms']:.2f} / {k['plain_min_ms']:.2f} | "
                         f"{k['engine_median_ms']:.2f} / {k['engine_min_ms']:.2f} | {k['speedup_median']:.2f}× | "
                         f"{mib(k['plain_peak_bytes']):.1f} / {mib(k['engine_peak_bytes']):.1f} | "
                         f"{_f(k['max_rel_diff'], '{:.1e}')} |")
    lines.append("")
    return "\n".join(lines)

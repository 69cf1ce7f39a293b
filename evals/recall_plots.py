"""Plots of a streamed recall run (recall_eval.run_stream): accuracy on the facts that left the window
against how many rounds ago their document was absorbed, and the memory each method holds as the
documents stream in. Written beside RESULTS.md by `absorber eval --tasks facts --stream`."""

from __future__ import annotations

from pathlib import Path

from .recall_eval import wilson

BIN = 4     # rounds per point of the accuracy plot: 4 questions a document leave single rounds too noisy


def plot_stream(result: dict, out: Path) -> list[str]:
    """Writes recall_by_age.png (and memory.png when the run recorded held memory); returns the names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["summary"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, name in enumerate(methods):
        got = [r for r in result["rows"] if r["method"] == name and not r.get("in_window")]
        aged = [r for r in got if r.get("rounds_ago") is not None]
        if not aged:            # a method that absorbs nothing: one level over every document
            if got:
                ax.axhline(100 * sum(r["correct"] for r in got) / len(got), ls="--", lw=1, color=f"C{i}",
                           label=f"{name} (every document)")
            continue
        xs, ys, lo, hi = [], [], [], []
        for start in range(0, max(r["rounds_ago"] for r in aged) + 1, BIN):
            cell = [r["correct"] for r in aged if start <= r["rounds_ago"] < start + BIN]
            if cell:
                p, (a, b) = sum(cell) / len(cell), wilson(sum(cell), len(cell))
                xs.append(start + (BIN - 1) / 2)
                ys.append(100 * p)
                lo.append(100 * (p - a))
                hi.append(100 * (b - p))
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=f"C{i}", label=name)
    ax.set_xlabel(f"rounds since the document was absorbed (bins of {BIN})")
    ax.set_ylabel("facts recalled (%), 95% interval")
    ax.set_ylim(-2, 102)
    ax.set_title(f"{result['model']}, {result['docs']} documents streamed, seed {result['seed']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall_by_age.png", dpi=110)
    plt.close(fig)
    written = ["recall_by_age.png"]
    curves = result.get("held_curve") or {}
    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, curve in curves.items():
            if curve:
                ax.plot(range(1, len(curve) + 1), [b / 2**20 for b in curve], marker=".", label=name)
        ax.set_xlabel("documents streamed")
        ax.set_ylabel("held memory (MiB)")
        ax.set_title("deltas held + KV of the raw tokens a question reads after them", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)
        written.append("memory.png")
    return written

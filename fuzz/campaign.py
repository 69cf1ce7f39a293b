"""A fuzzing campaign over every harness, writing its statistics as JSON.

    python -m fuzz.campaign --minutes 10 --out benchmarks/results/fuzz/campaign.json

Each target runs in its own process for an equal share of the time (one core: OMP_NUM_THREADS=1),
so a hard crash (a signal, an out-of-memory kill) ends that target only and is recorded as one.
Targets fed by bytes (the CLI's inputs, configs, memory files, model directories) run under
atheris, coverage-guided, when it imports, and report libFuzzer's edge coverage; the others (and
every target when atheris is missing) run hypothesis batches and report line coverage of
absorber_engine/ with coverage.py when it is installed. A contract violation is recorded with the
smallest input that showed it, and fuzzing goes on; crashes listed in fuzz.contract.KNOWN are
counted apart.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import TARGETS

COVERAGE_GUIDED = ("cli_input", "config_dict", "memory_file", "model_dir")
ROOT = Path(__file__).absolute().parent.parent       # not resolve(): a linked checkout fuzzes itself


def _have(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


class Recorder:
    """Counts executions, keeps one smallest input per distinct crash, and writes it all to a file
    every few seconds (libFuzzer ends the process without running Python's exit handlers)."""

    def __init__(self, target: str, engine: str, stats_path: str):
        self.stats = {"target": target, "engine": engine, "executions": 0, "crashes": {}, "known": {},
                      "started": time.time()}
        self.path, self.last_write = stats_path, 0.0

    def run(self, mod, inp, size: int) -> None:
        from .contract import ContractViolation, KnownCrash, signature

        self.stats["executions"] += 1
        try:
            mod.check(inp)
        except KnownCrash as exc:
            self.stats["known"][exc.entry.name] = self.stats["known"].get(exc.entry.name, 0) + 1
        except Exception as exc:          # noqa: BLE001  (every other exception is what we look for)
            sig = ("ContractViolation: " + str(exc).split(":")[-1].strip()[:80]) if isinstance(exc, ContractViolation) \
                else signature(exc)
            seen = self.stats["crashes"].get(sig)
            if seen is None or size < seen["size"]:
                self.stats["crashes"][sig] = {"count": (seen or {}).get("count", 0), "size": size,
                                              "input": repr(inp)[:2000], "message": f"{type(exc).__name__}: {exc}"[:1000]}
            self.stats["crashes"][sig]["count"] += 1
        self.flush()

    def flush(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last_write > 2.0:
            self.stats["seconds"] = round(now - self.stats["started"], 1)
            Path(self.path).write_text(json.dumps(self.stats, default=str))
            self.last_write = now


def _import_project(instrument: bool):
    """Imports every absorber_engine module up front, so atheris instruments all of them (modules
    the harnesses import lazily would otherwise run uninstrumented)."""
    import pkgutil

    import absorber_engine

    for info in pkgutil.walk_packages(absorber_engine.__path__, "absorber_engine."):
        try:
            importlib.import_module(info.name)
        except Exception:               # noqa: BLE001  (an optional extra, e.g. the server's, missing)
            pass


def worker_atheris(target: str, seconds: int, stats_path: str) -> None:
    import atheris

    with atheris.instrument_imports(include=["absorber_engine", "fuzz"]):
        _import_project(True)
        mod = importlib.import_module(f"fuzz.{target}")
    rec = Recorder(target, "atheris", stats_path)
    mod.check(mod.from_bytes(b""))            # build the shared fixtures before the clock matters

    def one(data: bytes) -> None:
        rec.run(mod, mod.from_bytes(data), len(data))

    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-rss_limit_mb=8192", "-timeout=120",
                   "-print_final_stats=1", "-max_len=4096"], one)
    atheris.Fuzz()


def worker_hypothesis(target: str, seconds: int, stats_path: str) -> None:
    from hypothesis import HealthCheck, given, settings

    cov = None
    if _have("coverage"):
        import coverage

        cov = coverage.Coverage(source=[str(ROOT / "absorber_engine")], data_file=None)
        cov.start()
    _import_project(False)
    mod = importlib.import_module(f"fuzz.{target}")
    rec = Recorder(target, "hypothesis", stats_path)
    mod.check(mod.from_bytes(b""))
    deadline = time.time() + seconds

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mod.strategy())
    def batch(inp):
        if time.time() < deadline:
            rec.run(mod, inp, len(repr(inp)))

    while time.time() < deadline:
        batch()
    if cov is not None:
        cov.stop()
        with open(os.devnull, "w") as devnull:
            rec.stats["line_coverage_pct"] = round(cov.report(file=devnull), 1)
    rec.flush(force=True)


def _parse_libfuzzer(log: str) -> dict:
    out = {}
    cov = re.findall(r"cov: (\d+) ft: (\d+)", log)
    if cov:
        out["edges_covered"], out["features"] = int(cov[-1][0]), int(cov[-1][1])
    done = re.findall(r"Done (\d+) runs in (\d+) second", log)
    if done:
        out["libfuzzer_runs"] = int(done[-1][0])
    return out


def run_target(target: str, seconds: int, engine: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = os.path.join(tmp, "stats.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
            [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
        cmd = [sys.executable, "-m", "fuzz.campaign", "--worker", target, "--seconds", str(seconds),
               "--stats", stats_path, "--engine", engine]
        start = time.time()
        try:
            done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=seconds + 300)
            code, log = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            code, log = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) \
                else (exc.stderr or "")
        stats = json.loads(Path(stats_path).read_text()) if os.path.exists(stats_path) else \
            {"target": target, "engine": engine, "executions": 0, "crashes": {}, "known": {}}
    stats["wall_seconds"] = round(time.time() - start, 1)
    stats.pop("started", None)
    if engine == "atheris":
        stats.update(_parse_libfuzzer(log))
    # libFuzzer exits 0 at its time limit; a signal or an out-of-memory kill is a crash of its own.
    if code not in (0, "timeout") and not stats["crashes"]:
        stats["crashes"]["process died"] = {"count": 1, "message": f"exit {code}: {log[-1500:]}"}
    if code == "timeout":
        stats["note"] = "the worker outlived its time by 5 minutes and was stopped"
    return stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz.campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="total time, shared equally by the targets")
    p.add_argument("--out", default="benchmarks/results/fuzz/campaign.json", help="statistics file (JSON)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto",
                   help="auto: atheris for the byte-fed targets when it imports, hypothesis for the rest")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=int, help=argparse.SUPPRESS)
    p.add_argument("--stats", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        (worker_atheris if args.engine == "atheris" else worker_hypothesis)(args.worker, args.seconds, args.stats)
        return 0
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {', '.join(TARGETS)}")
    atheris_ok = _have("atheris")
    if args.engine == "atheris" and not atheris_ok:
        p.error("atheris is not installed (pip install atheris); --engine hypothesis runs without it")
    seconds = max(10, int(args.minutes * 60 / len(targets)))
    from .contract import FIXED, KNOWN

    report = {"command": "python -m fuzz.campaign " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"python": platform.python_version(), "platform": platform.platform(),
                          "cpus": os.cpu_count(), "threads": 1},
              "atheris": atheris_ok, "coverage_py": _have("coverage"), "seconds_per_target": seconds, "targets": {}}
    for target in targets:
        engine = args.engine if args.engine != "auto" else (
            "atheris" if atheris_ok and target in COVERAGE_GUIDED else "hypothesis")
        print(f"fuzzing {target} with {engine} for {seconds} s", file=sys.stderr, flush=True)
        stats = run_target(target, seconds, engine)
        report["targets"][target] = stats
        print(f"  {stats['executions']} executions, {len(stats['crashes'])} distinct crashes, "
              f"{sum(stats['known'].values())} known", file=sys.stderr, flush=True)
    report["fixed"] = FIXED
    report["known_open"] = [{"name": k.name, "fix": k.fix} for k in KNOWN]
    report["total_executions"] = sum(s["executions"] for s in report["targets"].values())
    report["new_crashes"] = sum(len(s["crashes"]) for s in report["targets"].values())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    print(f"statistics written to {out}", file=sys.stderr)
    return 1 if report["new_crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())

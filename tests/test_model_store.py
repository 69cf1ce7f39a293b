"""The model cache: a conversion runs once however many processes ask at once, a failed one leaves
nothing behind, and names resolve to what they should."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from absorber_engine import InputError
from absorber_engine.model_store import _build_once, resolve


def _slow_build(tmp: Path) -> None:
    with open(tmp.parent / "builds.log", "a") as f:     # one line per build actually run
        f.write("built\n")
    time.sleep(1.0)                                      # long enough for the other process to arrive
    (tmp / "model.bin").write_text("weights")


def _ask(target: str, out) -> None:
    out.put(str(_build_once(Path(target), _slow_build, source="test")))


def test_two_processes_convert_once_and_share_the_result(tmp_path):
    target = tmp_path / "models" / "m"
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ask, args=(str(target), out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert {out.get(timeout=5), out.get(timeout=5)} == {str(target)}
    assert (tmp_path / "models" / "builds.log").read_text() == "built\n"
    assert (target / "model.bin").read_text() == "weights"
    assert [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".m.") and p.is_dir()] == []


def test_a_failed_build_leaves_nothing_and_the_next_one_runs(tmp_path):
    target = tmp_path / "models" / "m"

    def broken(tmp):
        (tmp / "half.bin").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _build_once(target, broken, source="test")
    assert not target.exists() and [p for p in target.parent.iterdir() if p.is_dir()] == []
    assert _build_once(target, lambda tmp: (tmp / "ok").write_text("1"), source="test") == target
    assert (target / "ok").read_text() == "1"


def test_resolve_names_directories_and_files(tmp_path):
    assert resolve(tmp_path) == str(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        resolve(tmp_path / "nothing-here")

"""Where memories are written: export_peft() directories and save_memory() paths of every kind
(new, existing files and directories, under a file, empty, NUL bytes, names too long, symlink
loops, objects that are no path), with names of any text.

Contract: the call writes a loadable adapter / memory file or raises InputError; the engine's
memory is unchanged either way; a refused call leaves no temporary file behind and what was at
the target before (a file, a directory) as it was.
"""

from __future__ import annotations

import json
import os

from hypothesis import strategies as st

from .contract import Reader, assert_unchanged, attempt, snapshot, violate
from .fixtures import fresh_dir, shipped_engine

NAME = "export_targets"

KINDS = ("fresh", "nested", "existing_file", "existing_dir", "under_a_file", "dir_at_file", "empty", "nul", "long",
         "loop", "none", "int", "bytes", "pathlike")
APIS = ("export_peft", "save_memory")


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    return {"api": r.choice(APIS), "kind": r.choice(KINDS), "name": r.text(12)}


def strategy():
    return st.fixed_dictionaries({"api": st.sampled_from(APIS), "kind": st.sampled_from(KINDS),
                                  "name": st.text(max_size=12)})


class _PathLike:
    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return self.path


def _target(work, inp: dict):
    """The path handed to the API (or the object), after preparing what lies there."""
    name = "".join(c for c in inp["name"] if c not in "/\x00")
    if name in ("", ".", ".."):              # the work directory itself, or its parent: not a new target
        name = "t"
    kind, api = inp["kind"], inp["api"]
    plain = str(work / name)
    if kind == "fresh":
        return plain
    if kind == "nested":
        return str(work / "a" / "b" / name)
    if kind == "existing_file":
        (work / name).write_bytes(b"previous contents")
        return plain
    if kind == "existing_dir":
        (work / name).mkdir()
        (work / name / "keep.txt").write_text("mine")
        return plain
    if kind == "under_a_file":
        (work / "file").write_bytes(b"x")
        return str(work / "file" / name)
    if kind == "dir_at_file":                 # where the adapter's config (or the memory) would go
        (work / name).mkdir()
        if api == "export_peft":
            (work / name / "adapter_config.json").mkdir()
        return plain
    if kind == "empty":
        return ""
    if kind == "nul":
        return plain + "\x00x"
    if kind == "long":
        return str(work / ("n" * 300))
    if kind == "loop":
        os.symlink(work / "loop", work / "loop")
        return str(work / "loop" / name) if api == "export_peft" else str(work / "loop")
    if kind == "pathlike":
        return _PathLike(plain)
    return {"none": None, "int": 3, "bytes": os.fsencode(plain)}[kind]


def _listing(work) -> dict:
    out = {}
    for root, dirs, files in os.walk(work):
        for f in files:
            p = os.path.join(root, f)
            out[p] = open(p, "rb").read() if not os.path.islink(p) else b"<link>"
        for d in dirs:
            out[os.path.join(root, d)] = b"<dir>"
    return out


def check(inp: dict) -> None:
    from absorber_engine.errors import InputError
    from absorber_engine.memory_file import read_memory_config

    base = shipped_engine()
    eng = base.engine
    work = fresh_dir("export")
    target = _target(work, inp)
    before, files = snapshot(eng.default), _listing(work)
    outcome, _ = attempt(lambda: getattr(eng, inp["api"])(target), allowed=InputError)
    what = f"{inp['api']}({target!r:.80}) [{inp['kind']}]"
    assert_unchanged(eng.default, before, what)
    leftovers = [p for p in _listing(work)
                 if os.path.basename(p).startswith((".adapter-", ".memory-")) and p.endswith(".tmp")]
    if leftovers:
        violate(f"{what}: temporary files left behind: {leftovers}")
    if outcome == "refused":
        if _listing(work) != files:
            violate(f"{what}: refused, but what was at the target changed")
        return
    path = os.fspath(target) if not isinstance(target, bytes) else os.fsdecode(target)
    if inp["api"] == "export_peft":
        with open(os.path.join(path, "adapter_config.json")) as f:
            if json.load(f)["r"] != eng.config.rank:
                violate(f"{what}: the adapter's rank is not the engine's")
        from safetensors.torch import load_file

        load_file(os.path.join(path, "adapter_model.safetensors"))
    else:
        read_memory_config(path)

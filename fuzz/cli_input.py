"""The command line's inputs: files of any bytes in any encoding (empty, huge, binary, token-id
files with junk), standard input, --encoding names (text codecs, byte codecs, nonsense), --prompt
with --ids, and --config files of any bytes.

Contract: `absorber` exits with one of its documented codes and never 1 (an internal error) or a
traceback; on a refused run the memory file given to --memory (a copy of a valid one, resumed
with --resume) keeps its bytes; a run that succeeds leaves a readable memory file. read_stream()
itself returns text or ids, or raises InputError.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys

from hypothesis import strategies as st

from .contract import ContractViolation, Reader, attempt, violate
from .fixtures import SHIPPED, SMALL, fresh_dir, scratch

NAME = "cli_input"

ENCODINGS = ("utf-8", "latin-1", "utf-16", "utf-32", "cp1252", "ascii", "utf-8-sig", "shift_jis", "UTF8", "utf_8",
             "base64", "rot13", "hex", "zlib", "bz2", "uu", "quopri", "punycode", "idna", "unicode_escape",
             "raw_unicode_escape", "undefined", "nope", "", " utf-8", "utf-8\x00")
SNIPPETS = (b"", b"The pass key is 1234.\n", b"1 2 3", b" 5\t6\n7 ", b"12 x 4", b"-1", b"2048", b"99999999999999999999999",
            b"\xef\xbb\xbf", b"\xff\xfe", b"\x00", b"\xb9\x00\xff", b"\\ud800", "\u0663 \u00b2".encode(), b"1_000",
            b"+5", b"0x10", b"1e3", "Caf\u00e9".encode("latin-1"), "\u65e5\u672c".encode("shift_jis"), b"\r\n" * 3)
MODES = ("absorb", "absorb", "generate", "read", "stdin")
EXIT_CODES = {0, 2, 3, 4, 5}
FLAGS = ["--chunk-tokens", str(SMALL["chunk_tokens"]), "--sync-tokens", str(SMALL["sync_tokens"]), "--rank",
         str(SMALL["rank"]), "--max-steps", "1", "--futures", "0", "--probes", "0", "--future-tokens", "4", "--quiet"]


def from_bytes(data: bytes) -> dict:
    r = Reader(data)
    mode = r.choice(MODES)
    parts = [r.choice(SNIPPETS) if r.bool() else r.blob(24) for _ in range(r.int_in(0, 5))]
    config = None
    if r.int_in(0, 5) == 0:
        config = r.choice((b"{}", b'{"rank": 2}', b'{"rank": 0}', b"[1]", b"{", b"\xff", b"[" * 3000, b'{"x": 1}',
                           b'{"max_steps": 1e999}', b"null"))
    return {"mode": mode, "data": b"".join(parts), "ids": r.bool(), "encoding": r.choice(ENCODINGS),
            "repeat": r.choice((1, 1, 1, 1000, 100_000)), "config": config}


def strategy():
    data = st.one_of(st.binary(max_size=48), st.lists(st.sampled_from(SNIPPETS), max_size=5).map(b"".join),
                     st.text(max_size=24).map(lambda t: t.encode("utf-8", "surrogatepass")))
    config = st.one_of(st.none(), st.sampled_from((b"{}", b"[1]", b"{", b"\xff", b"[" * 3000, b'{"x": 1}', b"null")),
                       st.binary(max_size=16))
    return st.fixed_dictionaries({"mode": st.sampled_from(MODES), "data": data, "ids": st.booleans(),
                                  "encoding": st.sampled_from(ENCODINGS), "repeat": st.sampled_from((1, 1, 1000)),
                                  "config": config})


def _valid_memory():
    """A memory file the CLI itself wrote with the flags above (built once)."""
    path = scratch() / "cli-base.absorber"
    if not path.exists():
        src = scratch() / "cli-base.txt"
        src.write_text(" ".join(str(i) for i in range(40, 70)))
        code, _, err = run_cli(["absorb", "--model", str(SHIPPED), "--input", str(src), "--ids", "--memory", str(path),
                                "--keep-window", *FLAGS])
        assert code == 0, err
    return path


def run_cli(argv) -> tuple[int, str, str]:
    from absorber_engine.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:                  # argparse refusing a flag
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def check(inp: dict) -> None:
    from absorber_engine.distributed import read_stream
    from absorber_engine.errors import InputError

    work = fresh_dir("cli")
    try:
        data = inp["data"] * (inp["repeat"] if inp["mode"] in ("read", "stdin") else 1)
        src = work / "input.txt"
        src.write_bytes(data)
        if inp["mode"] in ("read", "stdin"):
            stdin = sys.stdin
            if inp["mode"] == "stdin":
                sys.stdin = io.TextIOWrapper(io.BytesIO(data))
            try:
                outcome, value = attempt(lambda: read_stream("-" if inp["mode"] == "stdin" else str(src), inp["ids"],
                                                             inp["encoding"]), allowed=InputError)
            finally:
                sys.stdin = stdin
            if outcome == "ok" and not (isinstance(value, list) if inp["ids"] else isinstance(value, str)):
                violate(f"read_stream of {inp!r:.200} gave a {type(value).__name__}")
            return
        base = _valid_memory()
        memory = work / "memory.absorber"
        shutil.copy(base, memory)
        before = memory.read_bytes()
        if inp["mode"] == "absorb":
            argv = ["absorb", "--model", str(SHIPPED), "--input", str(src), "--encoding", inp["encoding"],
                    "--resume", str(memory), "--memory", str(memory), "--keep-window", *FLAGS]
        else:
            prompt = data.decode("utf-8", "replace").replace("\x00", "")
            argv = ["generate", "--model", str(SHIPPED), "--memory", str(memory), "--prompt", prompt,
                    "--max-new-tokens", "2", "--quiet"]
        if inp["ids"]:
            argv.append("--ids")
        if inp["config"] is not None and inp["mode"] == "absorb":
            (work / "config.json").write_bytes(inp["config"])
            argv += ["--config", str(work / "config.json")]
        code, out, err = run_cli(argv)
        what = f"absorber {' '.join(argv[:1])} with {inp!r:.240}"
        if code not in EXIT_CODES or "Traceback" in err:
            raise ContractViolation(f"{what}: exit {code}\n{err[-1500:]}")
        if code != 0 and not err.strip():
            violate(f"{what}: exit {code} without a message")
        if code in (2, 3, 4) and memory.read_bytes() != before:
            violate(f"{what}: exit {code} but the memory file changed")
        if code == 0 and inp["mode"] == "absorb":
            from absorber_engine.memory_file import read_memory_config

            read_memory_config(memory)
    finally:
        shutil.rmtree(work, ignore_errors=True)

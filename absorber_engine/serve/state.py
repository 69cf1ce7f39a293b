"""The state directory: every session's memory as a memory file, so a restarted server has it back.

Per session (files named by a hash of its id, which may hold any character):
  <stem>.<generation>.absorber   the memory file (delta, raw window, counters), written atomically
  <stem>.json                    which generation is current, the session id, and the conversation
                                 it has taken in (token count and digest)

The JSON is replaced atomically after its memory file is complete, and older generations are removed
only after that, so whatever moment the server is killed at, <stem>.json names a whole memory file
whose window and counters agree with the conversation record beside it.

A session whose files do not load (a record cut short, a memory made for another model or config)
is held: its files stay as they are, and its id is refused until a DELETE removes them (a request
naming it used to open an empty session whose first save removed the old memory file).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..output_files import write_whole

log = logging.getLogger("absorber.serve")

FORMAT = "absorber-serve-session"
VERSION = 1


@dataclass
class Saved:
    session_id: str
    memory: Path
    consumed: int
    digest: str
    generation: int


_OWN = re.compile(r"[0-9a-f]{32}\.[0-9]+\.absorber")       # <stem>.<generation>.absorber


def stem(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


class StateDir:
    def __init__(self, path):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.path / ".lock", "a")
        except OSError as exc:            # a file in the way, no permission: the flag's fault, not the disk's
            raise InputError(f"--state-dir {path}: {exc}") from None
        # One server a directory: a second removed the first one's writes in flight, and each one's
        # saves removed generations the other had just recorded.
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise InputError(f"the state directory {self.path} is in use by another server") from None
        for tmp in self.path.glob(".*.tmp"):          # writes a killed server left half done
            tmp.unlink(missing_ok=True)
        self.held: dict[str, str] = {}                 # stem -> why its files were not loaded

    def close(self) -> None:
        """Lets another server have the directory."""
        self._lock.close()

    def hold(self, session_id: str, why: str) -> None:
        self.held[stem(session_id)] = why

    def refusal(self, session_id: str) -> str | None:
        """Why `session_id` may not be opened, or None: its saved files did not load."""
        return self.held.get(stem(session_id))

    def save(self, session, session_id: str, consumed: int, digest: str, generation: int) -> None:
        s = stem(session_id)
        memory = self.path / f"{s}.{generation}.absorber"
        session.save_memory(memory)
        record = {"format": FORMAT, "version": VERSION, "session": session_id, "memory": memory.name,
                  "generation": generation, "consumed": consumed, "digest": digest}
        write_whole(self.path / f"{s}.json", json.dumps(record).encode())
        for old in self.path.glob(f"{s}.*.absorber"):
            if old != memory:
                old.unlink(missing_ok=True)

    def delete(self, session_id: str) -> None:
        s = stem(session_id)
        (self.path / f"{s}.json").unlink(missing_ok=True)      # first: from here on the session is gone
        for old in self.path.glob(f"{s}.*.absorber"):
            old.unlink(missing_ok=True)
        self.held.pop(s, None)

    def load_all(self) -> list[Saved]:
        out = []
        for record in sorted(self.path.glob("*.json")):
            try:
                d = json.loads(record.read_text())
                if d.get("format") != FORMAT or d.get("version") != VERSION:
                    raise ValueError(f"format {d.get('format')!r} version {d.get('version')!r}")
                saved = Saved(str(d["session"]), self.path / str(d["memory"]), int(d["consumed"]), str(d["digest"]),
                              int(d["generation"]))
                if record.stem != stem(saved.session_id) or not saved.memory.is_file():
                    raise ValueError("it does not match its memory file")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("state: not loading %s (left on disk, its id refused): %s", record.name, exc)
                self.held[record.stem] = f"its saved record {record.name} does not load ({exc})"
                continue
            out.append(saved)
        # Memory files no record names: a DELETE, or a session's first save, cut short between its
        # two files; older generations a save was killed before removing. A held record keeps its own.
        kept = {saved.memory for saved in out}
        for memory in self.path.glob("*.absorber"):
            # Only the server's own names (a hash, a generation): a user's memory files beside them stay.
            if memory not in kept and _OWN.fullmatch(memory.name) and memory.name.split(".", 1)[0] not in self.held:
                log.info("state: removing %s, which no session's record names", memory.name)
                memory.unlink(missing_ok=True)
        return out

"""The command line: a user's session from absorbing to an exported adapter, and exit codes that
scripts can rely on."""

import json
import os
import re
import subprocess
import sys

import pytest

from absorber_engine.cli import main
from tiny_models import make_model, random_ids


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model("llama").save_pretrained(path)
    return path


@pytest.fixture
def ids_file(tmp_path):
    f = tmp_path / "stream.txt"
    f.write_text(" ".join(map(str, random_ids(70, seed=1))))
    return f


SMALL = ["--chunk-tokens", "16", "--sync-tokens", "8", "--rank", "2", "--max-steps", "2", "--future-tokens", "4"]


def test_absorb_generate_export_session(model_dir, ids_file, tmp_path, capsys):
    mem = tmp_path / "mem.safetensors"
    assert main(["absorb", "--model", str(model_dir), "--input", str(ids_file), "--ids", "--memory", str(mem),
                 "--quiet", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "tokens absorbed : 70 of 70" in out and "rounds / steps" in out and mem.exists()
    assert main(["generate", "--model", str(model_dir), "--memory", str(mem), "--ids", "--prompt", "5 6 7",
                 "--max-new-tokens", "4"]) == 0
    generated = capsys.readouterr().out.split()
    assert len(generated) == 4 and all(t.isdigit() for t in generated)
    # The CLI's answer is the engine's own greedy continuation of that memory.
    from absorber_engine import AbsorberEngine
    from absorber_engine.memory_file import read_memory_config

    eng = AbsorberEngine.from_pretrained(model_dir, config=read_memory_config(mem))
    eng.load_memory(mem)
    assert eng.generate([5, 6, 7], max_new_tokens=4) == [int(t) for t in generated]
    adapter = tmp_path / "adapter"
    assert main(["export-peft", "--model", str(model_dir), "--memory", str(mem), "--out", str(adapter)]) == 0
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2


def test_resume_continues_the_stream(model_dir, ids_file, tmp_path, capsys):
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["absorb", "--model", str(model_dir), "--input", str(ids_file), "--ids", "--memory", str(first),
                 "--keep-window", "--quiet", *SMALL]) == 0
    assert main(["absorb", "--model", str(model_dir), "--input", str(ids_file), "--ids", "--memory", str(second),
                 "--resume", str(first), "--quiet", *SMALL]) == 0
    assert "140 in the stream so far" in capsys.readouterr().out


def test_resume_goes_on_with_the_memorys_config_unless_a_flag_says_otherwise(model_dir, ids_file, tmp_path):
    # --resume took the model's config (here the defaults: n = 1024, m = 2048) in silence
    from absorber_engine.memory_file import read_memory_config

    first, second, third = (tmp_path / f"{n}.absorber" for n in "abc")
    argv = ["absorb", "--model", str(model_dir), "--input", str(ids_file), "--ids", "--keep-window", "--quiet"]
    assert main([*argv, "--memory", str(first), *SMALL, "--futures", "1"]) == 0
    assert main([*argv, "--memory", str(second), "--resume", str(first)]) == 0
    assert read_memory_config(second) == read_memory_config(first)
    assert main([*argv, "--memory", str(third), "--resume", str(second), "--max-steps", "3"]) == 0
    assert read_memory_config(third) == read_memory_config(first).replace(max_steps=3)


def test_sigterm_during_absorb_saves_the_completed_rounds_as_ctrl_c_does(model_dir, tmp_path):
    # SIGTERM's default ended the process at once: no memory file, every completed round lost
    import signal
    import time

    stream = tmp_path / "long.txt"
    stream.write_text(" ".join(map(str, random_ids(20000, seed=2))))
    memory = tmp_path / "m.absorber"
    proc = subprocess.Popen([sys.executable, "-m", "absorber_engine.cli", "absorb", "--model", str(model_dir),
                             "--input", str(stream), "--ids", "--memory", str(memory), "--quiet", *SMALL],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(12)                                        # rounds under way: 20,000 tokens take far longer
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    taken = int(re.search(r"interrupted after (\d+) of the input's 20000 tokens", err).group(1))
    from absorber_engine.memory_file import read_memory

    _, meta = read_memory(memory)
    assert int(meta["tokens_absorbed"]) <= taken < 20000       # the file is written: what the rounds absorbed is kept


def test_absorb_many_refuses_an_out_dir_it_cannot_make_before_loading_the_model(model_dir, ids_file, tmp_path,
                                                                                 capsys, monkeypatch):
    # a folder under a file was found after the model loaded: exit 5 with two processes, a traceback
    # (exit 1) for a folder it had no permission to make
    from absorber_engine import distributed

    monkeypatch.setattr(distributed, "absorb_many_processes", lambda *a, **k: pytest.fail("the work started"))
    (tmp_path / "plain").write_text("a file")
    for out in (tmp_path / "plain" / "sub", tmp_path / "plain"):
        assert main(["absorb-many", "--model", str(model_dir), "--inputs", str(ids_file), "--ids",
                     "--out-dir", str(out), "--nproc", "2"]) == 2
        assert "--out-dir" in capsys.readouterr().err


@pytest.mark.parametrize("argv, code, message", [
    (["absorb", "--input", "{ids}", "--ids", "--memory", "{tmp}/m", "--chunk-tokens", "0"], 2, "chunk_tokens"),
    (["absorb", "--input", "{empty}", "--ids", "--memory", "{tmp}/m"], 2, "empty"),
    (["absorb", "--input", "{badids}", "--ids", "--memory", "{tmp}/m"], 2, "outside the vocabulary"),
    (["absorb", "--input", "{tmp}/missing.txt", "--ids", "--memory", "{tmp}/m"], 2, "missing.txt"),
    (["absorb", "--input", "{ids}", "--memory", "{tmp}/m"], 2, "no tokenizer"),
    (["generate", "--memory", "{tmp}/nope.safetensors", "--prompt", "1"], 4, "does not exist"),
    (["generate", "--memory", "{garbage}", "--prompt", "1"], 4, "not a readable memory file"),
    (["generate", "--ids", "--prompt", "1 2", "--recite"], 2, "recite needs a config that trains the recite probe"),
], ids=["bad config", "empty input", "bad ids", "missing input", "text without tokenizer", "missing memory",
        "corrupt memory", "recite without the recite probe"])
def test_exit_codes(model_dir, ids_file, tmp_path, capsys, argv, code, message):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.txt").write_text("1 2 100000")
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage")
    subs = {"ids": ids_file, "tmp": tmp_path, "empty": tmp_path / "empty.txt", "badids": tmp_path / "bad.txt",
            "garbage": tmp_path / "garbage.safetensors"}
    argv = [a.format(**subs) for a in argv] + ["--model", str(model_dir)]
    assert main(argv) == code
    assert message in capsys.readouterr().err


def test_unsupported_model_exit_code(tmp_path, ids_file, capsys):
    from transformers import BertConfig

    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    assert main(["absorb", "--model", str(tmp_path), "--input", str(ids_file), "--ids", "--memory",
                 str(tmp_path / "m")]) == 3
    assert "not supported" in capsys.readouterr().err
    assert main(["absorb", "--model", str(tmp_path / "none"), "--input", str(ids_file), "--ids", "--memory",
                 str(tmp_path / "m")]) == 2


def test_help_explains_every_option():
    import argparse

    from absorber_engine.cli_args import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) >= {"absorb", "generate", "export-peft", "absorb-many"}
    for name, command in sub.choices.items():
        for action in command._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
    out = subprocess.run([sys.executable, "-m", "absorber_engine.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "Exit codes" in out and "130" in out


def test_eval_help_leads_to_the_facts_evaluation(capsys):
    """The long-context parser is what `absorber eval --help` shows; the recall evaluation of a chat
    model has a parser of its own, reached only through --tasks facts, so the first must name it."""
    for argv, expected in ((["eval", "--help"], "absorber eval --tasks facts --help"),
                           (["eval", "--tasks", "facts", "--help"], "--recite")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        assert expected in " ".join(capsys.readouterr().out.split())


def test_text_input_is_decoded_with_a_clear_error(tmp_path, capsys):
    from absorber_engine.cli_args import SHIPPED_MODEL

    if not (SHIPPED_MODEL / "model.safetensors").exists():
        pytest.skip("model/absorber-tiny not built")
    binary = tmp_path / "file.bin"
    binary.write_bytes(b"The pass key is 1234.\n" + bytes([0xB9, 0x00, 0xFF]) * 1000)
    args = ["absorb", "--model", str(SHIPPED_MODEL), "--input", str(binary), "--memory", str(tmp_path / "m")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not valid utf-8 at byte offset 22" in err and "0xb9" in err and "Traceback" not in err
    assert main(args + ["--encoding", "no-such-codec"]) == 2
    assert "unknown text encoding" in capsys.readouterr().err
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Café notes: the code is 4821.\n".encode("latin-1"))
    assert main(["absorb", "--model", str(SHIPPED_MODEL), "--input", str(latin), "--encoding", "latin-1",
                 "--memory", str(tmp_path / "m2"), "--quiet", "--max-steps", "1"]) == 0


def test_absorb_reports_rounds_kept_short_of_reciting_their_text(tmp_path, capsys):
    """recite_exact with too few steps to reach it: the summary counts the rounds kept short."""
    from absorber_engine.cli_args import SHIPPED_MODEL

    if not (SHIPPED_MODEL / "model.safetensors").exists():
        pytest.skip("model/absorber-tiny not built")
    f = tmp_path / "records.txt"
    f.write_text('"dark wagon": 61492\n"sunny planet": 37807\n')
    config = tmp_path / "c.json"
    config.write_text('{"probes": 1, "probe_kinds": ["recite"], "recite_exact": 1, "sync_tokens": 0, "futures": 0}')
    args = ["absorb", "--model", str(SHIPPED_MODEL), "--input", str(f), "--quiet", "--memory",
            str(tmp_path / "m.safetensors"), "--config", str(config), "--max-steps", "1", "--lr", "1e-5"]
    assert main(args) == 0
    assert "rounds / steps  : 1 / 2 (1 rounds kept short of reciting their text: recite_exact ran out)" in \
        capsys.readouterr().out


def test_absorb_reports_rounds_the_surprise_gate_skipped(model_dir, tmp_path, capsys):
    """A stream of one chunk repeated: after the first two rounds nothing is new, and the summary
    says how many rounds the gate skipped; without the gate it says nothing of it."""
    f = tmp_path / "repeated.txt"
    f.write_text(" ".join(map(str, random_ids(16, seed=4) * 8)))
    args = ["absorb", "--model", str(model_dir), "--input", str(f), "--ids", "--quiet", "--memory",
            str(tmp_path / "m.safetensors"), "--chunk-tokens", "16", "--sync-tokens", "16", "--rank", "2",
            "--max-steps", "8", "--lr", "0.01"]
    assert main([*args, "--surprise-gate", "2"]) == 0
    out = capsys.readouterr().out
    assert "rounds / steps  : 7 / 16 (5 rounds skipped by the surprise gate)" in out
    assert main(args) == 0
    assert "rounds / steps  : 7 / 56\n" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--timeout", "nan"), ("--timeout", "0"),
                                         ("--max-queue", "0"), ("--idle-save", "-1"), ("--max-batch", "x"),
                                         ("--state-dir", ""), ("--served-model-name", " ")])
def test_serve_refuses_a_bad_flag_before_loading_the_model(flag, value, capsys, monkeypatch):
    # --timeout 0 answered every request 504, nan meant no deadline, --max-queue 0 an unbounded queue,
    # --port 70000 a traceback (exit 1) after the model had loaded, --state-dir '' no state directory
    from absorber_engine import cli

    monkeypatch.setattr(cli, "_load_engine", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as done:
        main(["serve", flag, value])
    assert done.value.code == 2 and flag in capsys.readouterr().err


def test_serve_on_a_port_in_use_exits_2_with_the_reason(capsys):
    # uvicorn's own exit code, 3, read as "model missing or unsupported"
    import socket

    pytest.importorskip("uvicorn")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--quiet", "--port", str(port)]) == 2
    assert f"could not listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_signal_while_the_memory_is_saved_waits_for_the_file_and_a_full_disk_is_exit_6(model_dir, ids_file, tmp_path,
                                                                                         monkeypatch, capsys):
    """A Ctrl-C or SIGTERM that landed while the run's memory was written lost every round, and the
    exit code (130) said they were saved; a full disk was a traceback and exit 1, "a bug"."""
    import errno
    import signal

    from absorber_engine import memory_file, output_files

    mem = tmp_path / "mem.safetensors"
    absorb = ["absorb", "--model", str(model_dir), "--input", str(ids_file), "--ids", "--memory", str(mem),
              "--quiet", *SMALL]
    real = memory_file.model_checksum
    monkeypatch.setattr(memory_file, "model_checksum", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM) or real(*a, **k))
    assert main(absorb) == 130
    assert int(memory_file.read_memory(mem)[1]["tokens_absorbed"]) == 70     # the run's rounds, saved whole
    monkeypatch.setattr(memory_file, "model_checksum", real)
    before = mem.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(output_files.os, "fsync", full)
    assert main(absorb) == 6
    assert "No space left on device" in capsys.readouterr().err
    assert mem.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_memory_path_that_holds_another_file_or_takes_none_is_refused_and_a_failed_run_keeps_the_old_memory(
        model_dir, ids_file, tmp_path, monkeypatch, capsys):
    """--memory naming the input text (or a model's weights) was written over, exit 0; /sys passed the
    check as root and the rounds were lost at the save; a run that completed no round, without
    --resume, replaced an earlier stream's memory with an empty one."""
    from absorber_engine import AbsorberEngine, AbsorptionError
    from absorber_engine.memory_file import read_memory

    text = ids_file.read_bytes()
    absorb = ["absorb", "--model", str(model_dir), "--input", str(ids_file), "--ids", "--quiet", *SMALL, "--memory"]
    assert main([*absorb, str(ids_file)]) == 2 and ids_file.read_bytes() == text
    assert "no absorber memory file" in capsys.readouterr().err
    if os.path.isdir("/sys/kernel"):                         # a filesystem that takes no new file, even from root
        assert main([*absorb, "/sys/kernel/mem.absorber"]) == 2
        assert "takes no new file" in capsys.readouterr().err
    mem = tmp_path / "earlier.absorber"
    assert main([*absorb, str(mem)]) == 0
    before = mem.read_bytes()

    def fails(*args, **kwargs):
        raise AbsorptionError("round 1 rolled back, memory unchanged: the sync loss became nan at step 0")

    monkeypatch.setattr(AbsorberEngine, "_run_batch", fails)
    assert main([*absorb, str(mem)]) == 5
    err = capsys.readouterr().err
    assert re.search(r"after \d+ of the input's 70 tokens were taken in; no round completed: .* left as it was", err)
    assert mem.read_bytes() == before and int(read_memory(mem)[1]["tokens_absorbed"]) == 70
    # absorb-many: an input named after a file in --out-dir that is no memory (a model's weights).
    from absorber_engine import InputError
    from absorber_engine.distributed import memory_paths

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stream.safetensors").write_bytes(b"a model's weights")
    with pytest.raises(InputError, match="no absorber memory file"):
        memory_paths([str(ids_file)], str(tmp_path / "out"))

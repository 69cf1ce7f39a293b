"""`absorber eval` / `absorber demo` refuse bad flag values with exit 2 and the flag named, before
any model loads (each was a traceback and exit 1, some only after the model's warm-up)."""

from __future__ import annotations

from pathlib import Path

import pytest

from absorber_engine.cli import main

TINY = str(Path(__file__).resolve().parents[2] / "model" / "absorber-tiny")

CASES = [
    (["eval", "--lengths", "x"], "--lengths takes multiples"),
    (["eval", "--lengths", "0", "--tasks", "passkey"], "--lengths must be at least 1"),
    (["eval", "--context", "10", "--lengths", "1", "--model", TINY], "--context must be at least 32"),
    (["demo", "--model", TINY, "--multiple", "1"], "--multiple must be at least 2"),
    (["eval", "--tasks", "facts", "--model", TINY, "--config", "notjson"], "--config is not JSON"),
    (["eval", "--tasks", "facts", "--model", TINY, "--config", '{"bogus": 1}'], "unknown: ['bogus']"),
    (["eval", "--tasks", "facts", "--model", TINY, "--config", "[]"], "must be a JSON object"),
    (["eval", "--tasks", "facts", "--model", TINY, "--threads", "-1"], "--threads must be at least 1"),
    (["eval", "--tasks", "facts", "--rescore", "{bad}"], "--rescore: cannot read"),
    # these ran or crashed: an empty results.json written over the stored one, a KeyError, a traceback
    (["eval", "--model", TINY, "--examples", "-1", "--lengths", "1", "--tasks", "passkey"], "--examples must be"),
    (["eval", "--tasks", "facts", "--model", TINY, "--docs", "0"], "--docs must be at least 1"),
    (["eval", "--tasks", "facts", "--rescore", "{empty}"], "is not a saved run"),
    (["bench", "--threads", "x"], "--threads takes 'auto' or a count"),
    (["bench", "--only", "nosuch", "--results", "{made}"], "unknown sections"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_eval_and_demo_flags_exit_2_naming_the_flag(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "empty.json").write_text("{}")
    argv = [a.replace("{bad}", str(tmp_path / "bad.json")).replace("{empty}", str(tmp_path / "empty.json"))
            .replace("{made}", str(tmp_path / "made")) for a in argv] + (
        ["--out", str(tmp_path / "out")] if argv[0] == "eval" else [])
    try:
        code = main(argv)
    except SystemExit as exc:                  # argparse's own exit, as a shell sees it
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "made").exists() and not (tmp_path / "out" / "results.json").exists()


def test_a_model_the_evaluation_cannot_run_exits_3_not_as_a_bug(tmp_path, capsys):
    # a directory with no model, a model without the trained context the long-context evaluation reads,
    # and a facts run on a tokenizer without a chat template each exited 1 (a traceback, or SystemExit)
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"
    from tiny_models import make_model

    make_model("llama").save_pretrained(plain)
    for argv, message in [(["eval", "--model", str(tmp_path / "empty"), "--lengths", "1"], "holds no config.json"),
                          (["demo", "--model", str(tmp_path / "empty")], "holds no config.json"),
                          (["eval", "--model", str(plain), "--lengths", "1", "--tasks", "passkey", "--methods", "none"],
                           "no absorber_trained_context: pass --context"),
                          (["demo", "--model", str(plain)], "this demo runs on models trained here"),
                          (["eval", "--tasks", "facts", "--model", TINY, "--docs", "1", "--methods", "none"],
                           "needs a tokenizer with a chat template")]:
        assert main(argv + (["--out", str(tmp_path / "out")] if argv[0] == "eval" else [])) == 3, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_recite_exact_in_config_leaves_ttt_its_own_budget():
    """--config '{"recite_exact": k}' changes the absorber's rounds; TTT, which trains no recite
    probe, keeps its budget: its config is not refused."""
    from evals.recall_eval import _configs

    configs = _configs(TINY, {"recite_exact": 4})
    assert (configs["absorber"].recite_exact, configs["ttt"].recite_exact, configs["ttt"].objective) == (4, 0, "ttt")

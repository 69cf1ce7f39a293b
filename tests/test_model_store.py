"""The model cache: a conversion runs once however many processes ask at once, a failed one leaves
nothing behind, and names resolve to what they should."""

import multiprocessing as mp
import time
from pathlib import Path

import pytest
import torch

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
    for value in (None, 123, b"bytes"):                  # a raw TypeError from os.fspath
        with pytest.raises(InputError, match="a model is a directory"):
            resolve(value)


def test_gpt2_weights_without_the_base_prefix_load_as_transformers_loads_them(tmp_path):
    """GPT-2's own checkpoints name their weights "h.0.attn..." without "transformer.": transformers
    loads them; the weight check used to refuse them."""
    from safetensors.torch import load_file, save_file
    from absorber_engine import AbsorberEngine
    from absorber_engine.model_store import load_pretrained
    from tiny_models import make_model

    model = make_model("gpt2")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded, _, _ = load_pretrained(tmp_path, tokenizer=False)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert AbsorberEngine.from_pretrained(tmp_path, tokenizer=False).runner.model_type == "gpt2"


def test_a_tokenizer_that_does_not_load_is_a_model_error(tmp_path):
    """Swallowed, it surfaced later as "this engine has no tokenizer", blaming the input."""
    import shutil
    from absorber_engine import UnsupportedModelError
    from absorber_engine.model_store import load_pretrained

    shipped = Path(__file__).resolve().parents[1] / "model" / "absorber-tiny"
    shutil.copytree(shipped, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(UnsupportedModelError, match="tokenizer that does not load"):
        load_pretrained(tmp_path / "m")


def test_a_build_folder_left_by_a_killed_process_is_removed_by_the_next_build(tmp_path):
    target = tmp_path / "models" / "m"
    left = tmp_path / "models" / ".m.k1ll3d_x"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_text("half written")
    other = tmp_path / "models" / ".m.x.abcdefgh"       # target "m.x"'s build: not ours to remove
    other.mkdir()
    assert _build_once(target, lambda tmp: (tmp / "ok").write_text("1"), source="test") == target
    assert not left.exists() and other.exists() and (target / "ok").read_text() == "1"


def test_a_config_that_disagrees_with_the_weights_on_the_layers_is_refused(tmp_path):
    # Safetensors holding 2 layers under a config of 1 dropped a layer in silence (logits 1.15 off);
    # pickled weights of 2 under a config of 4 loaded 2 random layers (0.32 off)
    import json

    from absorber_engine import UnsupportedModelError
    from absorber_engine.model_store import load_pretrained
    from tiny_models import make_model

    model = make_model("llama")
    for kind, layers in (("safetensors", 1), ("bin", 4)):
        path = tmp_path / kind
        model.save_pretrained(path)
        if kind == "bin":
            (path / "model.safetensors").unlink()
            torch.save(model.state_dict(), path / "pytorch_model.bin")
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=layers)))
        with pytest.raises(UnsupportedModelError, match="layers; the weights hold 2|disagree"):
            load_pretrained(path, tokenizer=False)
    (path / "config.json").write_text(json.dumps(dict(config, num_hidden_layers=2)))     # told the truth: loads
    assert len(load_pretrained(path, tokenizer=False)[0].model.layers) == 2
    # a buffer an older checkpoint holds (GPT-2's attn.masked_bias) is no disagreement
    gpt2 = make_model("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    weights = {k: v.clone() for k, v in gpt2.state_dict().items()}
    weights["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    (tmp_path / "gpt2" / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "gpt2" / "pytorch_model.bin")
    load_pretrained(tmp_path / "gpt2", tokenizer=False)

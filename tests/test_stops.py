"""Stop texts end an answer where their text appears, across tokens; by default the model's own end tokens."""

import pytest
import torch

from absorber_engine import AbsorberConfig, AbsorberEngine, InputError
from absorber_engine.cli_args import SHIPPED_MODEL
from absorber_engine.serve.prompts import PromptBuilder
from absorber_engine.stops import Stops, model_end_ids, parse, turn_end_ids

PROMPT = "The pass key is 71432. Remember it. The grass is green. The sky is blue. The pass key is"


@pytest.fixture(scope="module")
def eng():
    return AbsorberEngine.from_pretrained(SHIPPED_MODEL, config=AbsorberConfig(chunk_tokens=64, sync_tokens=8, rank=2))


def _spanning_stop(tok, ids):
    """A text of two consecutive new tokens whose second token also came earlier alone: ending at
    either token (the old rule) stops before the text does."""
    text = tok.decode(ids)
    for k in range(1, len(ids) - 1):
        stop = tok.decode(ids[k:k + 2])
        if ids[k + 1] in ids[:k] and stop.strip() and text.find(stop) >= len(tok.decode(ids[:k])):
            return stop
    pytest.skip("no spanning stop in this answer")


def test_a_stop_text_ends_the_answer_where_it_appears_across_tokens(eng):
    tok = eng.tokenizer
    full_ids = eng.generate(eng.to_ids(PROMPT), max_new_tokens=40, stop=[])
    full = tok.decode(full_ids)
    stop = _spanning_stop(tok, full_ids)
    assert len(eng.to_ids(stop)) >= 2
    cut = full[:full.find(stop)]
    assert eng.generate(PROMPT, max_new_tokens=40, stop=stop) == cut
    ids = eng.generate(eng.to_ids(PROMPT), max_new_tokens=40, stop=[stop])
    assert ids == full_ids[:len(ids)] and tok.decode(ids) == cut[:len(tok.decode(ids))]
    assert len(tok.decode(ids)) > len(cut) - len(stop) - 8     # the tokens before the text stay
    seen = []
    eng.generate_batch({"default": PROMPT}, max_new_tokens=40, stop=stop, on_token=lambda s, t: seen.append(t))
    assert tok.decode(seen).find(stop) >= 0                     # streaming saw the stop text's tokens


def test_a_stop_text_no_answer_holds_changes_nothing(eng):
    full = eng.generate(PROMPT, max_new_tokens=24, stop=[])
    assert eng.generate(PROMPT, max_new_tokens=24, stop=["@@@never@@@"]) == full


def test_an_added_token_text_is_its_id_and_empty_texts_are_refused(eng):
    # An added token's text stops at its id and, written in pieces, as text; it no longer replaces
    # the model's end tokens (an answer ran past </s> when "[INST]" was the stop).
    tok = eng.tokenizer
    bos = tok.convert_ids_to_tokens(tok.bos_token_id)
    got = parse(bos, tok, eng.runner.vocab_size)
    assert got == Stops(frozenset({tok.bos_token_id, tok.eos_token_id}), (bos,))
    with pytest.raises(InputError, match="empty"):
        eng.generate(PROMPT, max_new_tokens=2, stop=["x", ""])


def test_default_stops_are_the_tokenizers_eos_and_the_models_generation_config():
    class Cfg:
        eos_token_id = [5, 9, 10 ** 9]            # one id outside the vocabulary: not a stop

    class Model:
        generation_config = Cfg()

    class Tok:
        eos_token_id = 7

    assert model_end_ids(Model(), Tok(), 100) == [5, 9, 7]           # generation_config's order, then the tokenizer's
    assert model_end_ids(None, Tok(), 100) == [7]


def test_turn_ends_are_the_template_tokens_in_one_order_for_probes_and_the_server():
    class Tok:
        vocab = {"<|eot_id|>": 12, "<end_of_turn>": 40, "<|im_end|>": 3, "<unk>": 0}
        chat_template = "{{ m }}<end_of_turn> ... <|eot_id|> ... <|end|>"
        unk_token_id, eos_token_id = 0, 1

        def convert_tokens_to_ids(self, name):
            return self.vocab.get(name, self.unk_token_id)      # <|end|>: unknown, not a stop

    tok = Tok()
    assert turn_end_ids(tok) == [12, 40]                 # the list's order (eot_id before end_of_turn), not the template's
    assert turn_end_ids(tok, vocab_size=20) == [12]      # an id outside the model's vocabulary is none
    assert PromptBuilder(tok, 64).chat_stop_ids == {1, 12, 40}
    assert PromptBuilder(tok, 64).eos_ids == {1}
    assert PromptBuilder(tok, 20).chat_stop_ids == {1, 12}             # the server's vocabulary bounds them
    tok.chat_template = None
    assert turn_end_ids(tok) == []


def test_stop_texts_alone_keep_the_models_end_tokens_and_ids_replace_them(eng):
    tok = eng.tokenizer
    prompt = "Q: What is 2+2?\nA:"
    free = eng.generate(eng.to_ids(prompt), max_new_tokens=60, stop=[])
    assert tok.eos_token_id in free                                  # the answer reaches the end token
    ended = eng.generate(prompt, max_new_tokens=60)
    assert ended == tok.decode(free[:free.index(tok.eos_token_id)])
    assert eng.generate(prompt, max_new_tokens=60, stop="@@@") == eng.generate(prompt, max_new_tokens=60, stop=["@@@"]) == ended
    other = next(t for t in free if t != tok.eos_token_id)
    assert eng.generate(eng.to_ids(prompt), max_new_tokens=60, stop=[other, "@@@"]) == free[:free.index(other)]


def test_generate_stops_at_a_generation_config_end_token_the_tokenizer_does_not_name(eng):
    tok = eng.tokenizer
    full = eng.generate(eng.to_ids(PROMPT), max_new_tokens=16, stop=[])
    end = full[5]
    model = eng.runner.model
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [old, end] if isinstance(old, int) else list(old or []) + [end]
    try:
        assert end != tok.eos_token_id
        assert eng.generate(eng.to_ids(PROMPT), max_new_tokens=16) == full[:full.index(end)]
    finally:
        model.generation_config.eos_token_id = old
    assert torch.equal(torch.tensor(eng.generate(eng.to_ids(PROMPT), max_new_tokens=16, stop=[])), torch.tensor(full))


def test_the_cli_generates_with_stop_texts(eng, capsys):
    from absorber_engine.cli import main

    full = eng.generate(PROMPT, max_new_tokens=24, stop=[])
    stop = full.split()[2]                                     # a word of the answer: it ends before it
    assert main(["generate", "--model", str(SHIPPED_MODEL), "--prompt", PROMPT, "--max-new-tokens", "24",
                 "--stop", stop, "--stop", "@@@"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == full[:full.find(stop)]


def test_a_sentencepiece_answer_reads_as_it_follows_the_prompt():
    # Decoded alone, "▁The" read "The": a stop text " The" never matched an answer's first token,
    # and prompt + answer read "...isThe"
    from absorber_engine.stops import TextWatch, answer_text
    from tiny_tokenizers import sentencepiece_like

    tok = sentencepiece_like()
    the, key = tok.convert_tokens_to_ids("▁The"), tok.convert_tokens_to_ids("▁key")
    assert answer_text(tok, [the, key]) == " The key" and tok.decode([the, key]) == "The key"
    watch = TextWatch((" The",), tok, rows=1)
    assert watch(0, the) is False                       # stops at the first token, as transformers does
    assert watch.cut([the, key]) == ("", [])
    assert TextWatch((" key",), tok, rows=1).cut([the, key]) == (" The", [the])


def test_an_eos_text_outside_the_vocabulary_makes_no_end_of_unk():
    class Tok:
        eos_token_id = unk_token_id = 0                # "<|eot|>" not in the vocabulary resolves to <unk>

    assert model_end_ids(None, Tok(), 100) == []


def test_the_server_reads_a_templates_bos_once_and_streams_what_it_answers_whole():
    from absorber_engine.serve.prompts import PromptBuilder
    from tiny_tokenizers import sentencepiece_like, wordpiece_like

    tok = sentencepiece_like()
    msgs = [{"role": "user", "content": "Hello there"}]
    whole = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert whole[0] == tok.bos_token_id
    assert PromptBuilder(tok, len(tok), prefix=[tok.bos_token_id]).chat(msgs).ids == whole[1:]   # was <s><s>[INST]
    wp = wordpiece_like()
    ids = wp.encode("don't world", add_special_tokens=False)
    texts = [PromptBuilder(wp, len(wp)).decode(ids[:k]) for k in range(1, len(ids) + 1)]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))    # "don '" was sent, then "don't"

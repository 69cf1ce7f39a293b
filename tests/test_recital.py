"""generate(..., recite=True): every delta of a bank recites its round, the question reads the recital
it shares the longest run of tokens with (or the raw window), and the base model answers reading it
before the question: as a system message in a chat, a line before it in plain text
(absorber_engine/recital.py)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from absorber_engine import InputError, generate, recital
from absorber_engine.recital import answer_prompt, recite_rows
from tests.test_probes import CHATML, DEFAULT_SYSTEM, TINY, _chat, _engine, _tokenizer

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="model/absorber-tiny not built")


def _bank(tok, slots=3, lr=5e-2):
    torch.manual_seed(0)            # the chat tokens' new embeddings are drawn at random
    eng = _engine(tok, probes=1, probe_kinds=("recite",), memory_slots=slots, max_steps=2, lr=lr)
    for seed in range(3):
        eng.absorb(tok.decode(torch.randint(5, 500, (24,), generator=torch.Generator().manual_seed(seed))), flush=True)
    return eng


@pytest.mark.parametrize("template", [DEFAULT_SYSTEM, CHATML])
def test_the_recital_goes_in_a_system_message_right_before_the_question(template):
    tok = _tokenizer(template)
    eng = _engine(tok, probes=1, probe_kinds=("recite",))
    text = "The mill is run by Oda."
    recital, system = tok.encode(text, add_special_tokens=False), [{"role": "system", "content": text}]
    question = [{"role": "user", "content": "Who runs the mill?"}]
    earlier = [{"role": "user", "content": "And the ferry?"}, {"role": "assistant", "content": "Brann does."}]
    own = [{"role": "system", "content": "Be kind."}]

    def read(messages):
        return tok.decode(answer_prompt(eng.frame, eng._question_frame, recital, _chat(tok, messages)))

    def rendered(messages):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # A plain chat: the recital takes the place of the template's default system turn, if it has one.
    assert read(question) == rendered(system + question)
    # Earlier turns, or a system message of the caller's own, stay before it: it goes right before the question.
    assert read(earlier + question) == rendered(earlier + system + question)
    assert read(own + question) == rendered(own + system + question)
    assert read(own + earlier + question) == rendered(own + earlier + system + question)
    # No user turn at all: before the whole prompt.
    plain = tok.encode("Who runs the mill?", add_special_tokens=False)
    assert tok.decode(answer_prompt(eng.frame, eng._question_frame, recital, plain)) == \
        tok.decode(eng.frame.context_open + recital + eng.frame.context_end) + "Who runs the mill?"


def test_a_recital_ends_at_the_round_cut_once_it_could_have_and_at_its_rounds_length():
    tok = _tokenizer(DEFAULT_SYSTEM)
    eng = _engine(tok, probes=1, probe_kinds=("recite",))
    script = tok.encode("Oda runs the mill.\n\nBrann the ferry.\n\nAnd more.", add_special_tokens=False)
    asked = []

    def fake_generate_rows(runner, deltas, windows, prompts, max_tokens, temperature, top_p, stops, gens, on_token,
                           stacked=False):
        asked.append((prompts, max_tokens, temperature))
        out = [[] for _ in prompts]
        for row in range(len(prompts)):
            for t in script[:max_tokens]:
                out[row].append(t)
                if on_token(row, t) is False:
                    break
        return out

    def recite(longest, cut, cut_min=1, x=None):
        deltas = [SimpleNamespace(marks=x and recital.marks(x), round_tokens=len(x or []))] * len(longest)
        return [tok.decode(r) for r in recite_rows(eng.runner, eng.frame, deltas, ["window"] * len(longest),
                                                   longest, cut, cut_min, tok, fake_generate_rows)]

    assert recite([40], "\n\n") == ["Oda runs the mill."]
    assert asked == [([eng.frame.student_open + eng.frame.seeds["recite"]], 40, 0.0)]
    # The scheduler cuts a round only once X holds cut_min tokens: a break before that is inside X.
    first = len(tok.encode("Oda runs the mill.\n\n", add_special_tokens=False))
    assert recite([40], "\n\n", cut_min=first + 2) == ["Oda runs the mill.\n\nBrann the ferry."]
    # No cut configured: the whole recital, as written; each row at most its session's round.
    assert recite([40], "") == ["Oda runs the mill.\n\nBrann the ferry.\n\nAnd more."]
    assert recite([40, 3], "") == ["Oda runs the mill.\n\nBrann the ferry.\n\nAnd more.", tok.decode(script[:3])]
    # Stopped at its round's length inside a line no longer than those before it (a list cut short):
    # that line is the next round's, and goes. A longer last line is prose the cut ran through: kept.
    brann = len(tok.encode("Oda runs the mill.\n\nBrann", add_special_tokens=False))
    assert tok.decode(script[:brann]).endswith("Brann")
    assert recite([brann], "") == ["Oda runs the mill.\n"]
    script = tok.encode("Read on.\nOda runs the mill and Brann the ferry, and more", add_special_tokens=False)
    assert recite([len(script) - 2], "") == [tok.decode(script[:-2])]
    # With the marks of the round's X the recital keeps its lines whose runs match them (a line with a
    # token no mark vouches for goes whole); marks of the recital itself keep it whole.
    script = tok.encode("Oda runs the mill.\nBrann runs the ferry.\nIko rings the bell at noon.", add_special_tokens=False)
    assert recite([40], "", x=script) == [tok.decode(script)]
    # Nothing past X's end; an X the scheduler cut mid-line loses that half line, as at its length,
    # and one that ends a line keeps it whole.
    assert recite([40], "", x=script[:-3]) == ["Oda runs the mill.\nBrann runs the ferry."]
    line_end = len(tok.encode("Oda runs the mill.\nBrann runs the ferry.\n", add_special_tokens=False))
    assert script[:line_end] == tok.encode("Oda runs the mill.\nBrann runs the ferry.\n", add_special_tokens=False)
    assert recite([40], "", x=script[:line_end]) == ["Oda runs the mill.\nBrann runs the ferry."]
    x = tok.encode("Oda runs the mill.\nBrann runs the boat.\nIko rings the bell at noon.", add_special_tokens=False)
    departs = next(i for i, (a, b) in enumerate(zip(x, script)) if a != b)
    assert tok.decode(script[:departs // 8 * 8]) == "Oda runs the mill.\nBrann runs"
    assert recite([40], "", x=x) == ["Oda runs the mill."]       # "ferry" for "boat": no run after it in place
    # One token written wrong ("ferry" for "berry"): its run's lines go, the lines after it come back.
    text = "Oda runs the mill.\nBrann runs the ferry.\nIko rings the bell at noon.\nUla keeps the gate by the road."
    script, x = (tok.encode(t, add_special_tokens=False) for t in (text, text.replace("ferry", "berry")))
    assert len(x) == len(script) and sum(a != b for a, b in zip(x, script)) == 1
    assert recite([60], "", x=x) == ["Oda runs the mill.\nUla keeps the gate by the road."]
    # A token before X, or one doubled: X's runs are found a token late, its last line among them (the
    # recital is checked before it is cut to X's length, which would cut that run short).
    x = tok.encode("Oda runs the mill.\nBrann runs the ferry.\nIko rings the bell at noon.", add_special_tokens=False)
    script = tok.encode("\n", add_special_tokens=False) + x
    assert recite([len(x) + 1], "", x=x) == [tok.decode(x)]
    script = x[:1] + x
    assert recite([len(x) + 1], "", x=x) == ["Brann runs the ferry.\nIko rings the bell at noon."]


def test_marks_vouch_for_the_runs_of_x_a_recital_repeats():
    x = list(range(100, 121))                        # 21 tokens: runs of 8, 8 and 5
    marks = recital.marks(x)
    assert len(marks) == 3 and all(0 <= m <= 0xFFFF for m in marks) and recital.marks(x) == marks

    def vouched(ids):
        return sum(recital.vouched(ids, marks, 21)), len(ids)

    assert vouched(x) == (21, 21)
    assert vouched(x + [7, 8]) == (21, 23)                      # what follows X is not X's
    assert vouched(x[:19]) == (16, 19)                          # a run cut short does not match
    assert recital.vouched(x[:10] + [0] + x[11:], marks, 21) == [True] * 8 + [False] * 8 + [True] * 5
    assert vouched(x[:10] + x[11:]) == (13, 20)                 # a token lost: its run goes, the next is found
    assert vouched([5, 6] + x) == (21, 23)                      # a recital that starts two tokens in
    assert vouched(x[3:]) == (13, 18)                           # ... or three tokens late: its first run is lost
    assert vouched(list(range(500, 530)) + x) == (0, 51)        # too far from where X's runs would be
    assert vouched([]) == (0, 0) and recital.vouched(x[:3], None, 21) == [True] * 3


def test_every_delta_recites_and_the_base_model_answers_after_the_recital_it_picks(monkeypatch):
    tok = _tokenizer(DEFAULT_SYSTEM)
    eng = _bank(tok)
    prompt = _chat(tok, [{"role": "user", "content": "Who runs the mill?"}])
    # Two steps a round leave these deltas reciting little of their rounds, which their marks cut away:
    # with them every recital is shorter than written, and the question would read the empty window.
    marks = [d.marks for d in eng.default.slots]
    for d in eng.default.slots:
        d.marks = None                                       # recitals as written (a file from before marks)
    calls = []
    real = generate.generate_rows

    def spy(runner, deltas, windows, prompts, *args, **kwargs):
        out = real(runner, deltas, windows, prompts, *args, **kwargs)
        calls.append((deltas, prompts, out))
        return out

    monkeypatch.setattr(generate, "generate_rows", spy)
    memory = [t.detach().clone() for s in eng.default.slots for t in s.parameters()]
    answer = eng.generate(prompt, max_new_tokens=4, stop=[], recite=True)
    (rec_deltas, rec_prompts, recitals), (ans_deltas, ans_prompts, out) = calls
    # The recitals: every delta of the bank, oldest first, reading the recite seed in the student's frame.
    assert rec_deltas == list(eng.default.slots) and rec_prompts == [eng.frame.student_open + eng.frame.seeds["recite"]] * 3
    assert all(len(r) <= d.round_tokens + 1 for r, d in zip(recitals, eng.default.slots)) and any(recitals)
    texts = list(eng._windows.recitals[eng.default.key].values())   # kept for the next question: each its recital's text
    assert all(tok.decode(r).startswith(tok.decode(t)) for r, t in zip(recitals, texts))
    k = recital.pick(recital.asked(prompt, eng._question_frame), texts + [eng.window_tokens()])
    assert k < 3                                 # the window is empty (flushed): it shares nothing
    # The answer: the picked recital's text as the system message, read by the base model (Δ = 0).
    assert ans_prompts == [answer_prompt(eng.frame, eng._question_frame, texts[k], prompt)]
    assert ans_deltas == [eng._windows.zero(eng.default.key, eng.default.slots[-1])]
    # ... so it is what the bare model writes after that prompt (and the model's prefix).
    torch.manual_seed(0)            # the same draw as the engine's model (_bank)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    base.resize_token_embeddings(len(tok))
    read, want = eng.runner.prefix + ans_prompts[0], []
    with torch.no_grad():
        for _ in range(4):                                   # greedy, no stop token (stop=[] above)
            want.append(int(base(torch.tensor([read + want])).logits[0, -1].argmax()))
    assert answer == want == out[0]
    # Nothing of the memory moved.
    assert all(torch.equal(a, b) for a, b in zip(memory, [t for s in eng.default.slots for t in s.parameters()]))
    for d, m in zip(eng.default.slots, marks):
        d.marks = m
    eng._windows.drop(eng.default.key)
    eng.generate(prompt, max_new_tokens=4, stop=[], recite=True)
    cut = list(eng._windows.recitals[eng.default.key].values())
    assert any(map(len, texts)) and not any(map(len, cut))


@pytest.mark.parametrize("template", [DEFAULT_SYSTEM, None])
def test_the_question_reads_the_recital_sharing_the_longest_run_each_delta_recited_once(template, monkeypatch):
    tok = _tokenizer(template)
    eng = _bank(tok)
    said = ["The ferry is run by Brann.", "Oda runs the mill by the river.", "The bell rings at noon."]
    recited = []

    def fake_recite_rows(runner, frame, deltas, windows, longest, *rest):
        recited.append((list(deltas), list(longest)))
        return [tok.encode(t, add_special_tokens=False) for t in said[:len(deltas)]]

    answered = []
    monkeypatch.setattr(recital, "recite_rows", fake_recite_rows)
    monkeypatch.setattr(generate, "generate_rows", lambda runner, deltas, windows, prompts, *a: (
        answered.append((deltas, prompts)) or [[] for _ in prompts]))
    ask = (lambda q: _chat(tok, [{"role": "user", "content": q}])) if template else \
        (lambda q: tok.encode(q, add_special_tokens=False))
    zero = eng._windows.zero(eng.default.key, eng.default.slots[-1])

    def reads(question):
        eng.generate(ask(question), max_new_tokens=2, recite=True)
        return answered.pop()

    for question, k in (("Who runs the mill?", 1), ("When does the bell ring?", 2)):
        deltas, prompts = reads(question)
        text = tok.encode(said[k], add_special_tokens=False)
        assert deltas == [zero] and prompts == [answer_prompt(eng.frame, eng._question_frame, text, ask(question))]
    if template is None:                         # plain text: the recital, a line break, the question
        assert prompts == [tok.encode(said[2] + "\n" + "When does the bell ring?", add_special_tokens=False)]
    # Each delta recited once, for both questions: at most its round's length and the token that ends it.
    assert recited == [(list(eng.default.slots), [d.round_tokens + 1 for d in eng.default.slots])]
    assert all(0 < d.round_tokens <= eng.config.window_tokens for d in eng.default.slots)
    # A question the raw window shares as much with reads the window, with the base model, as asked;
    # held raw, the window took no round: the bank and its recitals stay.
    eng.absorb("Zyx wq")
    deltas, prompts = reads("Zyx wq?")
    assert len(recited) == 1 and deltas == [zero] and prompts == [ask("Zyx wq?")]
    # A round committed: only its delta recites; the full bank let its oldest go, and that recital with it.
    oldest, kept = eng.default.slots[0], list(eng.default.slots)[1:]
    eng.absorb("More about the mill.", flush=True)
    assert list(eng._windows.recitals[eng.default.key]) == kept       # the oldest's recital freed with it
    reads("Who runs the mill?")
    assert len(recited) == 2 and recited[1][0] == [eng.default.slots[-1]] and list(eng.default.slots)[:2] == kept
    assert list(eng._windows.recitals[eng.default.key]) == list(eng.default.slots) and oldest not in eng.default.slots
    eng.reset()                                          # the bank forgotten, every recital with it
    assert eng.default.key not in eng._windows.recitals


def test_a_zero_delta_a_round_trains_in_place_recites_again(tmp_path, monkeypatch):
    # A memory file may hold a bank whose newest delta is Δ = 0: its recital is the base model's, and
    # the next round trains that very delta (Session.round_delta), which must then recite anew.
    from safetensors import safe_open
    from safetensors.torch import save_file

    tok = _tokenizer(DEFAULT_SYSTEM)
    eng = _bank(tok)
    eng.save_memory(tmp_path / "bank.safetensors")
    with safe_open(tmp_path / "bank.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    last = len(eng.default.slots) - 1
    tensors = {k: v.zero_() if k.startswith(f"slots.{last}.") and k.endswith(".B") else v
               for k, v in tensors.items() if k != f"marks.{last}"}
    save_file(tensors, tmp_path / "zero_newest.safetensors", metadata=meta)
    eng.load_memory(tmp_path / "zero_newest.safetensors")
    newest = eng.default.slots[-1]
    assert newest.is_zero() and len(eng.default.slots) == 3
    monkeypatch.setattr(recital, "recite_rows", lambda runner, frame, deltas, *a: [
        tok.encode("made up" if d.is_zero() else "learned", add_special_tokens=False) for d in deltas])
    monkeypatch.setattr(generate, "generate_rows", lambda runner, deltas, windows, prompts, *a: [[] for _ in prompts])
    question = _chat(tok, [{"role": "user", "content": "What was learned?"}])
    eng.generate(question, max_new_tokens=2, recite=True)
    assert tok.decode(eng._windows.recitals[eng.default.key][newest]) == "made up"
    eng.absorb("Oda runs the mill.", flush=True)
    assert eng.default.slots[-1] is newest and not newest.is_zero()     # trained in place
    eng.generate(question, max_new_tokens=2, recite=True)
    assert tok.decode(eng._windows.recitals[eng.default.key][newest]) == "learned"


def test_recite_leaves_rows_without_a_bank_as_they_are_and_refuses_what_it_cannot_do():
    tok = _tokenizer(DEFAULT_SYSTEM)
    prompt = _chat(tok, [{"role": "user", "content": "Who runs the mill?"}])
    one = _bank(tok, slots=1, lr=1e-3)              # one delta holds every round: nothing of its own to recite
    assert one.generate(prompt, max_new_tokens=3, recite=True) == one.generate(prompt, max_new_tokens=3)
    # A bank, but no prompt to route on: the newest delta continues the raw window, which it keeps
    # (a recital had replaced the window with a system message).
    bank = _bank(tok)
    bank.absorb(tok.decode(list(range(40, 52))))                       # a raw window to continue
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recital, "recite_rows", lambda *a: pytest.fail("a row with no question recited"))
        assert bank.generate(None, max_new_tokens=3, recite=True) == bank.generate(None, max_new_tokens=3)
    with pytest.raises(InputError, match="recite must be true or false"):
        one.generate(prompt, max_new_tokens=3, recite="yes")
    bare = _engine(tok, probes=0, futures=1)           # no recite probe trained: no recital to ask for
    with pytest.raises(InputError, match="recite needs a config that trains the recite probe"):
        bare.generate(prompt, max_new_tokens=3, recite=True)


def test_a_bank_that_holds_its_first_round_only_recites_it():
    # One delta in a bank of several holds one round, not every round: recite=True was ignored until
    # a second round came (a document flushed once into smollm2-135m's recommended bank never recited)
    tok = _tokenizer(DEFAULT_SYSTEM)
    torch.manual_seed(0)
    eng = _engine(tok, probes=1, probe_kinds=("recite",), memory_slots=3, max_steps=2, lr=5e-2)
    prompt = _chat(tok, [{"role": "user", "content": "Who runs the mill?"}])
    with pytest.MonkeyPatch.context() as patch:        # nothing absorbed yet: nothing to recite
        patch.setattr(recital, "recite_rows", lambda *a: pytest.fail("an empty bank recited"))
        eng.generate(prompt, max_new_tokens=2, recite=True)
    eng.absorb("Oda runs the mill. Brann keeps the ferry.", flush=True)
    assert len(eng.default.slots) == 1 and eng.default.rounds == 1
    recited = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recital, "recite_rows", lambda runner, frame, deltas, *a: recited.append(deltas) or
                      [tok.encode("Oda runs the mill.", add_special_tokens=False)])
        eng.generate(prompt, max_new_tokens=2, recite=True)
    assert recited == [[eng.default.slots[0]]]


def test_a_template_without_a_system_turn_of_its_own_is_refused_clearly():
    refuses = "{% if messages[-1]['role'] == 'system' %}{{ raise_exception('a user turn must come last') }}{% endif %}"
    tok = _tokenizer(refuses + CHATML)
    eng = _engine(tok, probes=1, probe_kinds=("recite",))
    assert eng.frame.chat and eng.frame.context_end == []
    recital = tok.encode("The mill is run by Oda.", add_special_tokens=False)
    with pytest.raises(InputError, match="no system message of its own"):
        answer_prompt(eng.frame, eng._question_frame, recital, _chat(tok, [{"role": "user", "content": "Who?"}]))
    # generate() refuses such a prompt before any recital is written, whatever the memory holds.
    eng.absorb("Oda runs the mill. Brann keeps the ferry.", flush=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate.recital, "recite_rows", lambda *a: pytest.fail("recited before refusing"))
        with pytest.raises(InputError, match="no system message of its own"):
            eng.generate(_chat(tok, [{"role": "user", "content": "Who?"}]), max_new_tokens=2, recite=True)


def test_the_longest_shared_run_picks_and_a_tie_goes_to_the_later_candidate():
    assert recital.longest_run([1, 2, 3, 9], [0, 1, 2, 3, 4]) == 3
    assert recital.longest_run([1, 2, 1, 2], [2, 1, 2, 1, 7]) == 3          # [1, 2, 1] (or [2, 1, 2])
    assert recital.longest_run([], [1]) == recital.longest_run([5], [6]) == 0
    assert recital.pick([7, 8, 9], [[7, 8], [1, 7, 8, 9], [8, 9]]) == 1
    assert recital.pick([7, 8], [[7, 8], [0, 7, 8], []]) == 1                  # tie: the newer delta
    assert recital.pick([7, 8], [[7, 8], [7, 8]]) == 1                         # ... or the raw window, listed last
    # Only the prompt's last user turn is matched: an earlier turn's words choose nothing.
    frame = ([100], [101])
    assert recital.asked([100, 101, 5, 6, 101, 7, 8], frame) == [101, 7, 8]
    assert recital.asked([5, 6], frame) == [5, 6] and recital.asked([5, 6], None) == [5, 6]


def test_recite_exact_trains_past_max_steps_until_the_recital_is_the_rounds_text():
    tok = _tokenizer()
    # (its last line the longest: a recital stopped at the round's length keeps it, recite_rows)
    x = tok.encode('"dark wagon": 61492\n"sunny planet": 37807', add_special_tokens=False)
    reports = {}
    for extra in (0, 3, 300):
        torch.manual_seed(0)
        eng = _engine(tok, probes=1, probe_kinds=("recite",), memory_slots=2, max_steps=2, lr=5e-3, rank=16,
                      hidden_norm=True, recite_exact=extra)
        reports[extra] = eng.absorb(x, flush=True)
    # Two steps leave the delta far from its round's text: with the check off nothing is counted, with
    # too small a budget the round is kept and counted, with enough it trains on until it recites X.
    assert (reports[0].steps, reports[0].unrecited) == (2, 0)
    assert (reports[3].steps, reports[3].unrecited) == (5, 1)
    assert 5 < reports[300].steps < 302 and reports[300].unrecited == 0
    # What the check counted is what a greedy recital writes: the round's X, token for token.
    (delta,) = eng.default.slots
    assert (delta.round_tokens, delta.marks) == (len(x), recital.marks(x))     # the marks it is checked against
    (recited,) = recite_rows(eng.runner, eng.frame, [delta], [generate._window_kv(eng.runner, delta, eng.runner.prefix)],
                             [len(x)], "", 1, tok, generate.generate_rows)
    assert recited == x


def test_recite_under_llama_2s_template_says_it_has_no_place_for_a_recital():
    from tests.tiny_tokenizers import LLAMA2_TEMPLATE

    tok = _tokenizer(LLAMA2_TEMPLATE)
    eng = _engine(tok, probes=1, probe_kinds=("recite",))
    assert eng.frame.chat and eng.frame.context_end == [] and eng._question_frame is None
    with pytest.raises(InputError, match="no place in its prompts"):
        eng.generate(_chat(tok, [{"role": "user", "content": "Who?"}]), max_new_tokens=2, recite=True)


def test_a_bf16_recital_is_the_same_written_alone_or_beside_the_banks_other_deltas():
    # One delta alone was merged into the bf16 weights, several were added row by row: a kept recital
    # written alone after its round differed from the one written with the whole bank after a load,
    # and recite=True answers changed across save and load.
    from absorber_engine.generate import _window_kv, generate_rows

    tok = _tokenizer(DEFAULT_SYSTEM)
    torch.manual_seed(0)
    eng = _engine(tok, probes=1, probe_kinds=("recite",), memory_slots=4, max_steps=8, lr=3e-2, compute_dtype="bfloat16")
    for doc in ("Oda runs the mill.\nBrann keeps the ferry.\n", "The bell rings at noon.\nIko owns the red boat.\n",
                "Ula keeps the gate.\nThe key is 4471.\n", "Sven bakes bread.\nThe well is dry.\n"):
        eng.absorb(doc, flush=True)
    slots = list(eng.default.slots)
    for d in slots:
        d.marks = None                  # the text as written, not the lines the marks vouch for

    def recite(deltas):
        with torch.no_grad():
            return recite_rows(eng.runner, eng.frame, deltas, [_window_kv(eng.runner, d, eng.runner.prefix) for d in deltas],
                               [48] * len(deltas), "", 1, tok, generate_rows)

    assert recite(slots) == [recite([d])[0] for d in slots]


def test_held_bytes_counts_the_zero_delta_and_discard_window_keeps_the_banks_recitals():
    # The Δ = 0 the base model is read through (a whole delta's bytes, per session) was left out of
    # held_bytes; discard_window() dropped every recital, though none reads the window.
    tok = _tokenizer(DEFAULT_SYSTEM)
    torch.manual_seed(0)
    eng = _engine(tok, probes=1, probe_kinds=("recite",), memory_slots=3, max_steps=2, lr=5e-2)
    for doc in ("Oda runs the mill.\n", "The bell rings.\n", "Ula keeps the gate.\n"):
        eng.absorb(doc, flush=True)
    eng.absorb("Tor reads.\n")
    question = _chat(tok, [{"role": "user", "content": "Who runs the mill?"}])
    eng.generate(question, max_new_tokens=2, recite=True)
    cache, key = eng._windows, eng.default.key
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)           # noqa: E731
    kv = size(t for r in cache.READERS for pair in getattr(cache._kv.get((key, r)), "kv", []) for t in pair)
    recitals = 8 * sum(map(len, cache.recitals[key].values()))
    assert key in cache._zero and eng.held_bytes()["kv"] == kv + recitals + size(cache._zero[key].parameters())
    kept = dict(cache.recitals[key])
    eng.discard_window()
    assert cache.recitals[key] == kept
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate.recital, "recite_rows", lambda *a: pytest.fail("the bank recited again"))
        eng.generate(question, max_new_tokens=2, recite=True)


def test_marks_vouch_only_for_runs_in_the_rounds_order():
    # Two runs of X written in each other's place, or one left out, were vouched for whole: the base
    # model read "the key of the mill" joined to the gate's number.
    x = list(range(100, 148))
    runs = [x[i:i + 8] for i in range(0, 48, 8)]
    assert all(recital.vouched(x, recital.marks(x), 48))
    swapped = runs[0] + runs[2] + runs[1] + sum(runs[3:], [])
    skipped = runs[0] + sum(runs[2:], [])
    for text in (swapped, skipped):
        ok = recital.vouched(text, recital.marks(x), 48)
        assert not all(ok) and all(ok[:8])                  # what comes before the seam stays vouched
    doubled = x[:20] + [x[19]] + x[20:]                      # one token written twice: only its run is lost
    ok = recital.vouched(doubled, recital.marks(x), 48)
    assert ok == [True] * 16 + [False] * 9 + [True] * 24

"""Self-study probes: the frame around X and the probes, the teacher's states on them, the mask
that keeps what a row sampled after its end out of the loss, and rounds that learn from them."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from absorber_engine import AbsorberConfig, AbsorberEngine, ConfigError
from absorber_engine import generate
from absorber_engine.probes import SEED_PROMPTS, answer_mask, build_frame, kinds_per_round, question_frame, round_span
from absorber_engine.routing import asked_alone
from absorber_engine.round import student_losses
from absorber_engine.targets import RoundBatch
from absorber_engine.teacher import teacher_targets

TINY = Path(__file__).resolve().parents[1] / "model" / "absorber-tiny"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}"
                  "{% endif %}") + CHATML

pytestmark = pytest.mark.skipif(not (TINY / "model.safetensors").exists(), reason="model/absorber-tiny not built")


def _tokenizer(template=None):
    tok = AutoTokenizer.from_pretrained(TINY)
    if template is not None:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        tok.chat_template = template
    return tok


def _engine(tok, **cfg):
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    model.resize_token_embeddings(len(tok))
    base = dict(chunk_tokens=32, sync_tokens=0, rank=4, futures=0, probes=3, probe_tokens=6,
                compute_dtype="float32", max_steps=3, hidden_norm=False,
                probe_kinds=("question", "facts", "summary", "use", "creative"))
    return AbsorberEngine(model, tokenizer=tok, config=AbsorberConfig(**{**base, **cfg}))


def test_answer_mask_keeps_the_stop_and_drops_what_follows():
    ids = torch.tensor([[9, 9, 4, 5, 2, 7, 2], [9, 9, 4, 4, 4, 4, 4], [9, 2, 2, 5, 5, 5, 5]])
    mask = answer_mask(ids, forced=2, stop=[2])
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    # A stop token inside the forced opening does not end the probe.
    assert answer_mask(ids, forced=2, stop=[])[0].all()


def test_every_kind_the_config_accepts_has_a_seed():
    from absorber_engine.config import PROBE_KINDS

    assert set(SEED_PROMPTS) == set(PROBE_KINDS)


def test_kinds_are_spread_round_robin():
    assert kinds_per_round(("a", "b", "c"), 7) == [("a", 3), ("b", 2), ("c", 2)]
    assert kinds_per_round(("a", "b", "c"), 2) == [("a", 1), ("b", 1)]


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM])
def test_chat_frame_reads_like_the_template(template):
    tok = _tokenizer(template)
    frame = build_frame(tok, ("question", "summary"))
    assert frame.chat and tok.convert_tokens_to_ids("<|im_end|>") in frame.stop
    # A recite exchange ends with stop[0]: the template's end of turn, not the tokenizer's eos (whose
    # id, 1, is the smaller: sorted by id, recite probes ended in "</s>")
    assert frame.stop[0] == tok.convert_tokens_to_ids("<|im_end|>") and tok.eos_token_id in frame.stop
    x = tok.encode("Some notes.", add_special_tokens=False)
    # Teacher: X as a system message, then the seed as a user turn and the assistant's opening.
    teacher = frame.context_open + x + frame.context_close + frame.seeds["question"]
    want = tok.apply_chat_template([{"role": "system", "content": "Some notes."},
                                    {"role": "user", "content": SEED_PROMPTS["question"]}],
                                   tokenize=False, add_generation_prompt=True)
    assert tok.decode(teacher) == want
    # Student: what a plain chat with the model starts with (its default system turn, if any).
    student = frame.student_open + frame.seeds["question"]
    plain = tok.apply_chat_template([{"role": "user", "content": SEED_PROMPTS["question"]}], tokenize=False,
                                    add_generation_prompt=True)
    assert tok.decode(student) == plain


def _chat(tok, messages):
    return tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("template", [CHATML, DEFAULT_SYSTEM])
def test_a_question_after_earlier_turns_is_routed_as_if_asked_alone_in_a_fresh_chat(template, monkeypatch):
    tok = _tokenizer(template)
    frame = question_frame(tok)
    assert frame is not None and "user" in tok.decode(frame[1])
    earlier = [{"role": "user", "content": "Who runs the mill?"}, {"role": "assistant", "content": "It is Oda."},
               {"role": "user", "content": "And the ferry?"}, {"role": "assistant", "content": "Brann does."}]
    system = [{"role": "system", "content": "Notes: the mill is run by Oda, the ferry by Brann."}]
    question = [{"role": "user", "content": "What is the pass code?"}]
    alone = _chat(tok, question)
    for before in (earlier, system, system + earlier):
        assert asked_alone(_chat(tok, before + question), frame) == alone
    assert asked_alone(alone, frame) == alone                           # one user turn: as it is
    no_turn = tok.encode("plain text, no chat turn", add_special_tokens=False)
    assert asked_alone(no_turn, frame) == no_turn
    # The engine routes a prompt of several turns on its last question (a bank of 3 deltas).
    eng = _engine(tok, probes=1, probe_kinds=("recite",), memory_slots=3, max_steps=1)
    for seed in range(3):
        eng.absorb(tok.decode(torch.randint(5, 500, (24,), generator=torch.Generator().manual_seed(seed))), flush=True)
    assert len(eng.default.slots) == 3
    routed = []
    real = generate.route
    monkeypatch.setattr(generate, "route", lambda runner, deltas, ids, window=None, opening=0: routed.append(
        (ids, opening)) or real(runner, deltas, ids, window, opening))
    eng.generate(_chat(tok, system + earlier + question), max_new_tokens=1)
    # ... and tells the router how many of its first tokens are the template's fixed opening.
    assert routed == [(alone, len(frame[0]))] and alone[:len(frame[0])] == frame[0]
    routed.clear()
    eng.generate(no_turn, max_new_tokens=1)
    assert routed == [(no_turn, 0)]


def test_a_template_whose_turns_name_no_role_leaves_prompts_whole():
    tok = _tokenizer("{% for m in messages %}{{ '[T] ' + m['content'] + ' [/T]' }}{% endfor %}")
    assert question_frame(tok) is None and question_frame(_tokenizer()) is None and question_frame(None) is None
    ids = tok.encode("[T] a [/T][T] b [/T]", add_special_tokens=False)
    assert asked_alone(ids, None) == ids


def test_probe_targets_are_a_plain_forward_of_the_teacher_reading_x():
    tok = _tokenizer(CHATML)
    eng = _engine(tok)
    model, frame = eng.runner.model, eng.frame
    x = torch.tensor(tok.encode("The pass key is 12345. Remember it.", add_special_tokens=False))
    batch = RoundBatch([eng.delta], x[None], x[None, :0], [torch.Generator().manual_seed(0)], frame=frame)
    (targets,) = teacher_targets(eng.runner, batch, eng.config)
    assert [g.ids.shape[0] for g in targets.groups] == [1, 1, 1]         # 3 probes over 3 kinds
    assert targets.positions == sum(int(g.mask.sum()) for g in targets.groups)
    prefix = eng.runner.prefix
    for g, kind in zip(targets.groups, eng.config.probe_kinds):
        seed = frame.seeds[kind]
        assert g.ids[0, :len(seed)].tolist() == seed
        sampled = g.ids[0, len(seed):].tolist()
        # Up to probe_tokens sampled; fewer only once every row of the batch has sampled a stop token.
        assert 0 < len(sampled) <= 6 and (len(sampled) == 6 or set(sampled) & set(frame.stop))
        assert g.lead is None or g.lead[0].tolist() == frame.student_open
        seq = torch.tensor([prefix + frame.context_open + x.tolist() + frame.context_close + g.ids[0].tolist()])
        with torch.no_grad():
            out = model(seq, output_hidden_states=True)
        t, m = g.ids.shape[1], g.mask[0]
        for layer in range(eng.runner.num_states - 1):
            want = out.hidden_states[layer][0, -t:] * m[:, None]
            torch.testing.assert_close(g.hidden[layer][0], want, rtol=1e-4, atol=1e-4)


def test_a_round_on_probes_lowers_their_loss_and_hidden_norm_weighs_layers_equally():
    tok = _tokenizer(CHATML)
    eng = _engine(tok, max_steps=20, lr=1e-2, hidden_norm=True, kl_weight=0.5, ntp_weight=0.5)
    x = torch.tensor(tok.encode("Orlena keeps the spare key. The code is 4821.", add_special_tokens=False))
    batch = RoundBatch([eng.delta], x[None], x[None, :0], [torch.Generator().manual_seed(0)], frame=eng.frame)
    (targets,) = teacher_targets(eng.runner, batch, eng.config)
    # Normalized: the teacher's mean |h^l| over the synchronized positions is 1 at every layer.
    dim = eng.runner.hidden_size
    for layer in range(eng.runner.num_states):
        total = sum(float(g.hidden[layer].abs().sum()) for g in targets.groups)
        assert total / (targets.positions * dim) == pytest.approx(1.0, rel=1e-4)

    def loss():
        (value,) = student_losses(eng.runner, [eng.delta], [targets], eng.config, backward=False, xs=x[None])
        return value

    before = loss()
    report = eng.absorb(x.tolist(), flush=True)
    assert report.rounds == 1 and report.steps == 20
    assert loss() < 0.7 * before


def test_probes_config_is_checked_and_a_model_without_tokenizer_skips_them():
    for bad in (dict(probes=-1), dict(probe_tokens=0), dict(probe_kinds=("nonsense",)), dict(probe_kinds=()),
                dict(probe_temperature=0.0), dict(probe_top_p=1.5), dict(ntp_weight=-1.0), dict(hidden_norm=1)):
        with pytest.raises(ConfigError):
            AbsorberConfig(**bad)
    tok = _tokenizer()                                   # no chat template: plain-text frame
    frame = build_frame(tok, ("facts",))
    assert not frame.chat and frame.context_open == [] and frame.seeds["facts"][-1:] == tok.encode("\n", add_special_tokens=False)[-1:]
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    eng = AbsorberEngine(model, tokenizer=None, config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                      probes=2, futures=1, max_steps=1))
    assert eng.frame is None
    assert eng.absorb(list(range(5, 40)), flush=True).rounds >= 1


def test_replay_keeps_a_bounded_buffer_of_earlier_rounds_and_survives_a_memory_file(tmp_path):
    from tiny_models import make_model, random_ids

    cfg = AbsorberConfig(chunk_tokens=8, sync_tokens=4, rank=2, futures=1, future_tokens=3, max_steps=2,
                         replay_rounds=2, compute_dtype="float32", hidden_norm=False)
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    ids = random_ids(8 * 4 + 4, seed=3)
    seen = []
    from absorber_engine import round as rounds

    real = rounds.teacher_targets

    def spy(runner, batch, cfg):
        seen.append([q.tolist() for q in batch.replay[0]])
        targets = real(runner, batch, cfg)
        if batch.replay[0]:
            # The replay group's targets are the round-start model reading the probes alone.
            group = targets[0].groups[-1]
            for i, q in enumerate(batch.replay[0]):
                with torch.no_grad():
                    out = runner.model(torch.tensor([runner.prefix + q.tolist()]), output_hidden_states=True)
                torch.testing.assert_close(group.hidden[1][i, :len(q)], out.hidden_states[1][0, len(runner.prefix):],
                                           rtol=1e-4, atol=1e-4)
        return targets

    rounds.teacher_targets, saved = spy, rounds.teacher_targets
    try:
        eng.absorb(ids)
    finally:
        rounds.teacher_targets = saved
    chunks = [ids[i * 8:(i + 1) * 8] for i in range(4)]
    assert seen == [[], [chunks[0]], chunks[:2], chunks[1:3]]          # at most replay_rounds, oldest dropped
    assert eng.held_bytes()["replay"] == 8 * 16
    eng.save_memory(tmp_path / "m.absorber")
    other = AbsorberEngine(make_model("llama"), config=cfg)
    other.load_memory(tmp_path / "m.absorber")
    assert [q.tolist() for q in other.default.replay] == chunks[2:4]


@pytest.mark.parametrize("replay_batch", [0, 1])
def test_a_batch_mixing_sessions_with_and_without_replay_equals_each_alone(replay_batch):
    from tiny_models import make_model, random_ids

    cfg = AbsorberConfig(chunk_tokens=8, sync_tokens=4, rank=2, max_steps=2, replay_rounds=2, kl_weight=1.0,
                         futures=0, compute_dtype="float32", replay_batch=replay_batch)
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    eng.session("a").absorb(random_ids(20, seed=1))                       # a now has two rounds to replay
    assert len(eng.session("a").replay) == 2
    eng.session("a").feed(random_ids(8, seed=2))
    eng.session("b").feed(random_ids(12, seed=3))
    reports = eng.run()
    assert reports["a"].rounds == reports["b"].rounds == 1 and not reports["a"].errors + reports["b"].errors
    alone = AbsorberEngine(make_model("llama"), config=cfg)
    alone.session("b").absorb(random_ids(12, seed=3))
    for k, v in alone.session("b").delta.state_dict().items():
        torch.testing.assert_close(eng.session("b").delta.state_dict()[k], v, rtol=1e-4, atol=1e-6, msg=k)


def test_next_token_loss_read_off_the_recite_probe_is_the_plain_loss_of_that_sequence():
    import torch.nn.functional as F

    tok = _tokenizer(CHATML)
    eng = _engine(tok, probes=1, probe_kinds=("recite",), ntp_in_recite=True, ntp_weight=1.0, kl_weight=0.0,
                  hidden_weight=1e-9, max_steps=5, lr=1e-2)
    x = torch.tensor(tok.encode("The ferry to Quell leaves at 7:40 from pier 9.", add_special_tokens=False))
    batch = RoundBatch([eng.delta], x[None], x[None, :0], [torch.Generator().manual_seed(0)], frame=eng.frame)
    (targets,) = teacher_targets(eng.runner, batch, eng.config)
    (group,) = targets.groups
    start, n = group.x_span
    assert group.ids[0, start:start + n].tolist() == x.tolist()
    # The student's sequence: its opening, the recite seed, X, the end of turn. Each token of X is
    # predicted from the one before it, the first from the seed's last.
    seq = torch.tensor([eng.runner.prefix + eng.frame.student_open + group.ids[0].tolist()])
    with torch.no_grad():
        logits = eng.runner.model(seq).logits[0]
    at = len(eng.runner.prefix) + len(eng.frame.student_open) + start
    want = F.cross_entropy(logits[at - 1:at - 1 + n], x).item()
    (got,) = student_losses(eng.runner, [eng.delta], [targets], eng.config, backward=False)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)      # the sync term weighs 1e-9 here
    assert eng.absorb(x.tolist(), flush=True).steps == 5
    (after,) = student_losses(eng.runner, [eng.delta], [targets], eng.config, backward=False)
    assert after < 0.9 * got                                   # the round trained on that loss


@pytest.mark.parametrize("top_k", [0, 5])
def test_recite_probe_takes_its_kl_and_next_token_loss_from_one_head_product(monkeypatch, top_k):
    """With the teacher's distribution kept (the torch backend's round), the recite probe's KL and
    its next-token loss on X come out of one LM-head product: the same loss and delta gradient as
    the KL and the cross-entropy computed apart (the teacher's distribution dropped)."""
    from absorber_engine import round as round_mod

    tok = _tokenizer(CHATML)
    eng = _engine(tok, probes=1, probe_kinds=("recite",), ntp_in_recite=True, ntp_weight=0.7, kl_weight=1.3,
                  kl_top_k=top_k, hidden_norm=True)
    eng.absorb(tok.encode("Mira keeps the spare key under the blue pot by the door.", add_special_tokens=False),
               flush=True)                                                    # a delta that is not zero
    x = torch.tensor(tok.encode("The ferry to Quell leaves at 7:40 from pier 9.", add_special_tokens=False))
    batch = RoundBatch([eng.delta], x[None], x[None, :0], [torch.Generator().manual_seed(0)], frame=eng.frame)
    (targets,) = teacher_targets(eng.runner, batch, eng.config)
    (group,) = targets.groups
    assert group.x_span is not None and group.teacher_p is not None

    def run():
        for t in eng.delta.parameters():
            t.grad = None
        (loss,) = student_losses(eng.runner, [eng.delta], [targets], eng.config, backward=True)
        return loss, [t.grad.clone() for t in eng.delta.parameters()]

    apart = round_mod._recite_next_token_loss
    monkeypatch.setattr(round_mod, "_recite_next_token_loss", lambda *a: pytest.fail("the CE ran apart"))
    fused, fused_grads = run()
    monkeypatch.setattr(round_mod, "_recite_next_token_loss", apart)
    group.teacher_p = None
    plain, plain_grads = run()
    assert fused == pytest.approx(plain, rel=1e-5)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_replay_batch_reads_every_replayed_round_once_a_cycle_with_the_whole_buffers_weight():
    from tiny_models import make_model, random_ids

    from absorber_engine.replay import replay_rows

    cfg = AbsorberConfig(chunk_tokens=8, sync_tokens=4, rank=2, futures=0, max_steps=2, replay_rounds=4, kl_weight=1.0,
                         compute_dtype="float32", hidden_norm=False)
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    eng.absorb(random_ids(12, seed=5))                                   # a delta that is not zero
    replay = [torch.tensor(random_ids(n, seed=10 + n)) for n in (5, 9, 3, 7)]   # rounds of different lengths
    batch = RoundBatch([eng.delta], torch.tensor([random_ids(8, seed=1)]), torch.tensor([random_ids(4, seed=2)]),
                       [torch.Generator().manual_seed(0)], replay=[replay])
    (whole,) = teacher_targets(eng.runner, batch, cfg)
    assert whole.groups[-1].replay and whole.groups[-1].ids.shape[0] == 4 and whole.groups[-1].hidden

    def loss(step, k, norm=False):
        c = cfg.replace(replay_batch=k, hidden_norm=norm)
        (targets,) = teacher_targets(eng.runner, batch, c)               # the whole buffer's states, held
        assert len(targets.groups[-1].hidden) == len(whole.groups[-1].hidden)
        return student_losses(eng.runner, [eng.delta], [targets], c, backward=False, step=step)[0]

    full = loss(1, 0)                    # step 0 reads no replay: its targets are the student's own states
    assert loss(0, 0) < full
    # Two rows a step, weighted 4/2: a cycle of two steps weighs what two steps over all four do.
    assert loss(2, 2) + loss(3, 2) == pytest.approx(2 * full, rel=1e-5)
    assert loss(4, 1) + loss(5, 1) + loss(6, 1) + loss(7, 1) == pytest.approx(4 * full, rel=1e-5)
    assert loss(8, 1) == pytest.approx(loss(4, 1), rel=1e-6)            # in turn: step 8 reads round 0 again
    assert loss(1, 4) == pytest.approx(full, rel=1e-6) and loss(1, 9) == pytest.approx(full, rel=1e-6)
    # The rows read at a step carry their own targets, cut out of the buffer's (masked positions
    # row after row for the KL), scaled by the layer scales of the groups read whole (hidden_norm).
    (part,) = teacher_targets(eng.runner, batch, cfg.replace(replay_batch=2, hidden_norm=True))
    sub, weight = replay_rows(part.groups[-1], 1, 2)                     # step 1: rounds 2 and 3
    assert weight == 2.0 and sub.ids.tolist() == whole.groups[-1].ids[2:].tolist()
    for h, want, scale in zip(sub.hidden, whole.groups[-1].hidden, part.layer_scale):
        torch.testing.assert_close(h, want[2:] * scale, rtol=1e-5, atol=1e-5)
    before = int(whole.groups[-1].mask[:2].sum())
    torch.testing.assert_close(sub.final, whole.groups[-1].final[before:], rtol=1e-5, atol=1e-5)
    # Those scales are the round's own groups', the replay read in part setting none of them.
    alone = RoundBatch(batch.deltas, batch.x, batch.y, [torch.Generator().manual_seed(0)])
    (own,) = teacher_targets(eng.runner, alone, cfg.replace(hidden_norm=True))
    assert part.layer_scale == pytest.approx(own.layer_scale, rel=1e-6)


def test_ttt_replays_the_next_token_loss_of_each_replayed_document():
    import torch.nn.functional as F
    from tiny_models import make_model, random_ids

    from absorber_engine.replay import replay_groups
    from absorber_engine.round import next_token_losses, ttt_round
    from absorber_engine.targets import SyncTargets

    cfg = AbsorberConfig(chunk_tokens=8, sync_tokens=4, rank=2, futures=0, max_steps=2, replay_rounds=4,
                         kl_weight=0.0, compute_dtype="float32", objective="ttt")
    eng = AbsorberEngine(make_model("llama"), config=cfg)            # no tokenizer: a replayed probe is X itself
    eng.absorb(random_ids(12, seed=5))
    replay = [torch.tensor(random_ids(n, seed=10 + n)) for n in (5, 9, 3)]
    x = torch.tensor([random_ids(8, seed=1)])
    batch = RoundBatch([eng.delta], x, x[:, :0], [torch.Generator().manual_seed(0)], replay=[replay])
    (grp,) = replay_groups(eng.runner, batch, False, text=True)
    assert grp.text and not grp.hidden

    def ce(rows):          # every token of every row after its first, predicted from the one before
        eng.runner.bind([eng.delta])
        P, total, count = len(eng.runner.prefix), 0.0, 0
        for q in rows:
            with torch.no_grad():
                logits = eng.runner.model(torch.tensor([eng.runner.prefix + q.tolist()])).logits[0, P:]
            total += F.cross_entropy(logits[:-1], q[1:], reduction="sum").item()
            count += len(q) - 1
        return total / count

    for k, picks in ((0, [replay]), (2, [replay[:2], [replay[2], replay[0]]])):
        c = cfg.replace(replay_batch=k)
        for step, rows in enumerate(picks):
            (got,) = student_losses(eng.runner, [eng.delta], [SyncTargets([grp], 0)], c, backward=False, step=step)
            assert got == pytest.approx(ce(rows), rel=1e-5)
    # A TTT round's first loss is its next-token loss on X plus that of the replayed documents.
    want = next_token_losses(eng.runner, [eng.delta], x, cfg, 1.0, backward=False)[0] + ce(replay)
    (res,) = ttt_round(eng.runner, batch, cfg)
    assert res.losses[0] == pytest.approx(want, rel=1e-5) and res.steps == 2


def test_templates_that_refuse_a_system_message_or_write_the_bos_get_a_frame_that_works():
    """A template that refuses a system message before a user turn (Mistral v0.1's alternation
    check) made the engine impossible to build with the default config; one that drops it unpacked
    nothing; one that writes the BOS (Llama 3's) had teacher and student read it twice."""
    alternate = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                 "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
                 "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    drops = ("{% for m in messages %}{% if m['role'] != 'system' %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
             "+ '<|im_end|>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    for template in (alternate, drops):
        with pytest.warns(UserWarning, match="probes use plain text"):
            eng = _engine(_tokenizer(template), probes=1, probe_kinds=("question",))
        assert not eng.frame.chat
        assert eng.absorb("The key is under the blue pot.", flush=True).rounds == 1
    tok = _tokenizer("{{ bos_token }}" + CHATML)
    eng = _engine(tok, probes=1, probe_kinds=("recite",))
    assert eng.runner.prefix == [tok.bos_token_id]
    x = tok.encode("Key 4821 is under the pot.", add_special_tokens=False)
    teacher = eng.runner.prefix + eng.frame.context_open + x + eng.frame.context_close + eng.frame.seeds["recite"]
    template = tok.apply_chat_template([{"role": "system", "content": tok.decode(x)},
                                        {"role": "user", "content": SEED_PROMPTS["recite"]}], tokenize=True,
                                       add_generation_prompt=True, return_dict=False)
    assert teacher == template and teacher.count(tok.bos_token_id) == 1


def test_the_position_check_counts_what_the_student_reads_and_a_session_without_y():
    """The student reads its probe in its own opening (a long default system turn), longer than
    the teacher's X in a short round: an IndexError at the first flush. A session opened with
    sync_tokens=0 was checked with the config's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer(DEFAULT_SYSTEM.replace("Be brief.", "Be brief. " * 20))

    def gpt2(positions):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=positions,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        return model.eval()

    cfg = AbsorberConfig(chunk_tokens=4, sync_tokens=0, rank=2, futures=0, probes=1, probe_tokens=4,
                         probe_kinds=("question",), max_steps=1, compute_dtype="float32")
    frame = build_frame(tok, ("question",), prefix=[tok.bos_token_id])
    student = 1 + len(frame.student_open) + len(frame.seeds["question"]) + 4
    teacher = 1 + len(frame.context_open) + 4 + len(frame.context_close) + len(frame.seeds["question"]) + 4
    assert student > teacher                          # the student's row is the round's longest
    with pytest.raises(ConfigError, match="the student's 'question' probe"):
        AbsorberEngine(gpt2(student - 1), tokenizer=tok, config=cfg)
    eng = AbsorberEngine(gpt2(student), tokenizer=tok, config=cfg)
    assert eng.absorb("Key 4821.", flush=True).rounds >= 1
    # A session whose long X, without Y, fits the positions; with the config's Y of 8 it would not.
    n = len(frame.student_open) + 8
    with_y = AbsorberConfig(**{**cfg.to_dict(), "sync_tokens": 8})
    eng = AbsorberEngine(gpt2(1 + round_span(with_y, frame, n, 0)[0]), tokenizer=tok, config=with_y)
    eng.session("no y", chunk_tokens=n, sync_tokens=0)
    with pytest.raises(ConfigError, match="past the"):
        eng.session("with y", chunk_tokens=n, sync_tokens=8)


def test_the_frame_is_cut_between_tokens_and_reads_the_templates_own_ids():
    """Llama 3's template: "|>" ends both "<|eot_id|>" and "<|begin_of_text|>", and a frame cut at
    the characters both sequences end with split those special tokens into plain characters: the
    decoded text was the same, the ids not."""
    llama3 = ("{% for m in messages %}{% set c = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
              "m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set c = '<|begin_of_text|>' + c %}"
              "{% endif %}{{ c }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    tok = _tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                                                          "<|end_header_id|>"]})
    tok.chat_template = llama3
    frame = build_frame(tok, ("question",))
    x = tok.encode("Some notes.", add_special_tokens=False)
    chat = lambda messages: tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,  # noqa: E731
                                                    return_dict=False)
    ask = {"role": "user", "content": SEED_PROMPTS["question"]}
    assert frame.context_open + x + frame.context_close + frame.seeds["question"] == \
        chat([{"role": "system", "content": "Some notes."}, ask])
    assert frame.student_open + frame.seeds["question"] == chat([ask])
    opening, turn = question_frame(tok)
    assert tok.convert_ids_to_tokens(turn[:1]) == ["<|start_header_id|>"] and opening == tok.encode(
        "<|begin_of_text|>", add_special_tokens=False)


def test_a_sentencepiece_frame_reads_the_templates_own_ids_around_x_and_in_the_students_prompt():
    """A "▁" tokenizer puts a space before the first word of a text encoded alone: the frame's
    pieces, encoded one by one, read a lone "▁" after X and "▁ ▁Ask" in the student's prompt, which
    Llama 2's template writes as "<0x0A>" and "▁Ask". What stays apart from the template: X's own
    first word (encoded alone by absorb()) and the teacher's seed, which it shares with the student."""
    from tiny_tokenizers import LLAMA2_TEMPLATE, sentencepiece_like

    tok = sentencepiece_like()
    tok.chat_template = LLAMA2_TEMPLATE
    bos = [tok.bos_token_id]
    frame = build_frame(tok, ("question",), prefix=bos)
    chat = lambda messages: tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,  # noqa: E731
                                                    return_dict=False)
    ask = {"role": "user", "content": SEED_PROMPTS["question"]}
    assert bos + frame.student_open + frame.seeds["question"] == chat([ask])
    notes = "Tom's pass key is 71432."
    whole = chat([{"role": "system", "content": notes}, ask])
    newline = tok.encode("\n", add_special_tokens=False)
    x_in_chat = tok.encode("\n" + notes, add_special_tokens=False)[len(newline):]     # X as the template reads it
    start = len(bos + frame.context_open)
    assert whole[:start] == bos + frame.context_open and whole[start:start + len(x_in_chat)] == x_in_chat
    assert whole[start + len(x_in_chat):][:len(frame.context_close)] == frame.context_close
    assert tok.convert_ids_to_tokens(frame.context_close[:1]) == ["<0x0A>"]

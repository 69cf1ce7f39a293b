"""The synchronization objective: the teacher's cached states are a plain forward over X·future,
and a round moves the contextless model toward the model that reads the context."""

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from absorber_engine import AbsorberConfig, AbsorberEngine
from absorber_engine.round import student_losses
from absorber_engine.targets import RoundBatch
from absorber_engine.teacher import teacher_targets
from tiny_models import ARCHS, make_model, random_ids

BOS = 1      # the tiny models' bos_token_id: every sequence the engine starts reads it first


def _round(eng, x, y, seed=0):
    return RoundBatch([eng.delta], x[None], y[None], [torch.Generator().manual_seed(seed)], prompt=eng._prompt)


def _loss(eng, targets):
    (loss,) = student_losses(eng.runner, [eng.delta], [targets], eng.config, backward=False)
    return loss


def _final_norm(runner):
    return runner.base.ln_f if runner.model_type == "gpt2" else runner.base.norm


@pytest.mark.parametrize("arch, follow_y", [(a, False) for a in ARCHS] + [("llama", True)])
def test_teacher_states_equal_a_plain_forward(arch, follow_y):
    model = make_model(arch)
    eng = AbsorberEngine(model, config=AbsorberConfig(chunk_tokens=12, sync_tokens=7, rank=2, futures=3, hidden_norm=False,
                                                      future_tokens=5, kl_weight=1.0, futures_follow_y=follow_y))
    x = torch.tensor(random_ids(12, seed=3))
    y = torch.tensor(random_ids(7, seed=4))
    (targets,) = teacher_targets(eng.runner, _round(eng, x, y), eng.config)
    real, sampled = targets.groups
    assert targets.positions == 7 + 3 * 5
    assert real.ids.tolist() == [y.tolist()] and sampled.ids.shape == (3, 5)
    L = eng.runner.num_states - 1
    for group in (real, sampled):
        for b in range(group.ids.shape[0]):
            # The engine starts at BOS; with futures_follow_y the sampled futures continue X·Y.
            lead = [x, y] if follow_y and group is sampled else [x]
            seq = torch.cat([torch.tensor([BOS]), *lead, group.ids[b]])[None]
            with torch.no_grad():
                out = model(seq, output_hidden_states=True)
            t = group.ids.shape[1]
            # transformers' hidden_states: h^0..h^{L-1} as they are, the last one after the final norm.
            for layer in range(L):
                torch.testing.assert_close(group.hidden[layer][b], out.hidden_states[layer][0, -t:],
                                           rtol=1e-4, atol=1e-4)
            with torch.no_grad():
                normed = _final_norm(eng.runner)(group.hidden[L][b])
            torch.testing.assert_close(normed, out.hidden_states[L][0, -t:], rtol=1e-4, atol=1e-4)
            final = group.final.view(group.ids.shape[0], t, -1)[b]
            torch.testing.assert_close(final, out.hidden_states[L][0, -t:], rtol=1e-4, atol=1e-4)


def test_sampled_futures_follow_the_teacher_distribution():
    # Greedy futures are exactly the teacher's greedy continuation of X.
    model = make_model("llama")
    cfg = AbsorberConfig(chunk_tokens=10, sync_tokens=6, rank=2, futures=2, future_tokens=6,
                         future_temperature=1e-6)
    eng = AbsorberEngine(model, config=cfg)
    x = torch.tensor(random_ids(10, seed=5))
    (targets,) = teacher_targets(eng.runner, _round(eng, x, torch.tensor([], dtype=torch.long)), cfg)
    (group,) = targets.groups
    seq = [BOS] + x.tolist()
    for _ in range(6):
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert group.ids[0].tolist() == seq[11:]
    assert group.ids[1].tolist() == seq[11:]


def _kl_to_teacher(model, eng, x, y):
    """KL(teacher with X in context || engine without X) on Y's next-token distributions."""
    with torch.no_grad():
        teacher = model(torch.tensor([[BOS] + x + y])).logits[0, 1 + len(x):].float()
    student = eng.logits(y)
    return torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                      reduction="batchmean").item()


@pytest.mark.parametrize("kl_weight", [0.0, 1.0])
def test_one_round_lowers_the_loss_and_moves_logits_toward_the_teacher(kl_weight):
    model = make_model("llama")
    cfg = AbsorberConfig(chunk_tokens=24, sync_tokens=16, rank=8, futures=2, future_tokens=8, ntp_weight=0.0, hidden_norm=False,
                         max_steps=40, lr=1e-2, kl_weight=kl_weight)
    eng = AbsorberEngine(model, config=cfg)
    x, y = random_ids(24, seed=7), random_ids(16, seed=8)
    kl_before = _kl_to_teacher(model, eng, x, y)
    (targets,) = teacher_targets(eng.runner, _round(eng, torch.tensor(x), torch.tensor(y)), cfg)
    loss_before = _loss(eng, targets)
    report = eng.absorb(x + y)
    assert report.rounds == 1 and report.steps == 40 and report.held_tokens == 16
    loss_after = _loss(eng, targets)
    kl_after = _kl_to_teacher(model, eng, x, y)
    assert loss_after < 0.5 * loss_before, (loss_before, loss_after)
    assert kl_after < 0.7 * kl_before, (kl_before, kl_after)


def test_ttt_objective_trains_on_the_context():
    model = make_model("llama")
    cfg = AbsorberConfig(chunk_tokens=24, sync_tokens=8, rank=8, objective="ttt", max_steps=30, lr=1e-2)
    eng = AbsorberEngine(model, config=cfg)
    x = random_ids(24, seed=9)
    ce = lambda: torch.nn.functional.cross_entropy(eng.logits(x)[:-1], torch.tensor(x[1:])).item()
    before = ce()
    report = eng.absorb(x, flush=True)          # nothing stays in the window: logits read X alone
    assert report.rounds == 1 and report.steps == 30 and report.held_tokens == 0
    assert ce() < 0.5 * before


def test_early_stop_at_stop_loss():
    model = make_model("llama")
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4, futures=0, max_steps=50, lr=1e-2, stop_loss=1e9)
    eng = AbsorberEngine(model, config=cfg)
    report = eng.absorb(random_ids(24))
    assert report.rounds == 1 and report.steps == 0      # the first loss is already below eps


def test_checkpointed_layers_give_the_same_round(monkeypatch):
    from absorber_engine import layer_forward

    recomputed = []                 # each checkpointed layer call, so the run compared is checkpointed
    monkeypatch.setattr(layer_forward, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    ids = random_ids(40, seed=11)
    deltas = []
    for ckpt in (False, True):
        cfg = AbsorberConfig(chunk_tokens=24, sync_tokens=16, rank=4, futures=2, future_tokens=8, max_steps=5,
                             lr=1e-2, kl_weight=0.5, checkpoint_layers=ckpt, compute_dtype="float32")
        eng = AbsorberEngine(make_model("llama"), config=cfg)
        report = eng.absorb(ids)
        assert report.rounds == 1 and report.steps == 5
        assert bool(recomputed) == ckpt
        deltas.append(eng.delta.state_dict())
    assert len(recomputed) >= 5 * len(eng.runner.layers)
    for k, v in deltas[0].items():
        torch.testing.assert_close(deltas[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_prompted_futures_start_with_the_prompt_and_keep_teacher_states():
    model = make_model("llama")
    cfg = AbsorberConfig(chunk_tokens=12, sync_tokens=8, rank=2, futures=3, future_tokens=7, future_prompt=(5, 6, 7),
                         hidden_norm=False,
                         compute_dtype="float32")
    eng = AbsorberEngine(model, config=cfg)
    x = torch.tensor(random_ids(12, seed=3))
    (targets,) = teacher_targets(eng.runner, _round(eng, x, torch.tensor([], dtype=torch.long)), cfg)
    (group,) = targets.groups
    assert group.ids.shape == (3, 7) and group.ids[:, :3].tolist() == [[5, 6, 7]] * 3
    seq = torch.cat([torch.tensor([BOS]), x, group.ids[1]])[None]
    with torch.no_grad():
        out = model(seq, output_hidden_states=True)
    for layer in range(eng.runner.num_states - 1):
        torch.testing.assert_close(group.hidden[layer][1], out.hidden_states[layer][0, -7:], rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="future_prompt"):
        AbsorberEngine(make_model("llama"), config=cfg.replace(future_prompt=tuple(range(3, 10))))


def test_groups_sharing_one_student_pass_give_each_its_own_loss_and_gradient(monkeypatch):
    """Y (7 tokens) and three futures that read Y before them (5 tokens after a 7-token lead) go
    through one padded pass; each stream's losses and gradients are those of one pass per group."""
    import copy

    from absorber_engine import round as round_mod

    cfg = AbsorberConfig(chunk_tokens=12, sync_tokens=7, rank=2, futures=3, future_tokens=5, futures_follow_y=True,
                         kl_weight=1.0, compute_dtype="float32")
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    eng.absorb(random_ids(20, seed=8))                                  # a delta that is not zero
    other = copy.deepcopy(eng.delta)
    with torch.no_grad():
        for t in other.parameters():
            t.mul_(-0.5)
    deltas = [eng.delta, other]
    x = torch.tensor([random_ids(12, seed=3), random_ids(12, seed=5)])
    y = torch.tensor([random_ids(7, seed=4), random_ids(7, seed=6)])
    batch = RoundBatch(deltas, x, y, [torch.Generator().manual_seed(s) for s in (0, 1)])
    targets = teacher_targets(eng.runner, batch, cfg)
    assert round_mod._passes([g for g in targets[0].groups]) == [[0, 1]]

    def run():
        for d in deltas:
            for t in d.parameters():
                t.grad = None
        losses = student_losses(eng.runner, deltas, targets, cfg, backward=True)
        return losses, [t.grad.clone() for d in deltas for t in d.parameters()]

    joined, joined_grads = run()
    monkeypatch.setattr(round_mod, "_passes", lambda groups: [[i] for i in range(len(groups))])
    alone, alone_grads = run()
    assert joined == pytest.approx(alone, rel=1e-5) and joined[0] != pytest.approx(joined[1], rel=1e-3)
    for a, b in zip(joined_grads, alone_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_surprise_gate_rule():
    """A first loss below gate × the median of the stream's recent first losses takes no step; one
    at or above it, or a stream with no history, trains as usual."""
    from absorber_engine.lora import LowRankDelta
    from absorber_engine.train import train_deltas

    cfg = AbsorberConfig(max_steps=3, lr=1e-2, surprise_gate=1.5)
    deltas = [LowRankDelta({"w": (4, 4)}, 2, 1.0, torch.device("cpu"), seed=s) for s in range(3)]
    first = [1.4, 1.6, 0.1]             # streams 0 and 1 have history [0.5, 1.0, 9.0] (median 1.0)
    calls = [[], [], []]                # loss evaluations per stream: the first returns first[i]

    def loss_fn(active):
        out = []
        for i in active:
            (deltas[i].A["w"].sum() + deltas[i].B["w"].sum()).backward()
            out.append(first[i] if len(calls[i]) == 0 else 1.0)
            calls[i].append(1)
        return out

    before = [d.state_dict() for d in deltas]
    res = train_deltas(deltas, loss_fn, cfg, [[0.5, 1.0, 9.0], [0.5, 1.0, 9.0], []])
    assert [r.gated for r in res] == [True, False, False]
    assert [r.steps for r in res] == [0, 3, 3] and res[0].losses == [1.4]
    for k, v in before[0].items():
        assert torch.equal(deltas[0].state_dict()[k], v)
    assert not torch.equal(deltas[1].state_dict()["w.B"], before[1]["w.B"])
    # The gate off: the same first loss trains.
    calls[0].clear()
    res = train_deltas(deltas[:1], loss_fn, cfg.replace(surprise_gate=0.0), [[0.5, 1.0, 9.0]])
    assert not res[0].gated and res[0].steps == 3


def test_surprise_gate_skips_rounds_of_text_the_memory_predicts():
    """A stream of one chunk repeated. The first two rounds always train (the first sets no level);
    after them every round's first loss is no higher than the second's, so a gate of 2 skips them
    all: Δ stays what the first two made, the report counts them, the replay buffer holds only the
    rounds that trained, and reset forgets the history."""
    chunk = random_ids(16, seed=4)
    cfg = AbsorberConfig(chunk_tokens=16, sync_tokens=16, rank=4, max_steps=8, lr=1e-2, replay_rounds=4,
                         surprise_gate=2.0, compute_dtype="float32")
    eng = AbsorberEngine(make_model("llama"), config=cfg)
    first = eng.absorb(chunk * 3)
    assert first.rounds == 2 and first.steps == 16 and first.gated == 0
    assert len(eng.default.surprise) == 1                  # the stream's first round sets no level
    after_first = eng.delta.state_dict()
    report = eng.absorb(chunk * 5)
    assert report.rounds == 5 and report.gated == 5 and report.steps == 0
    for k, v in after_first.items():
        assert torch.equal(eng.delta.state_dict()[k], v), k
    assert len(eng.default.replay) == 2 and len(eng.default.surprise) == 6
    losses = list(eng.default.surprise)
    assert all(loss < 2.0 * losses[0] for loss in losses[1:])
    eng.reset()
    assert len(eng.default.surprise) == 0 and len(eng.default.replay) == 0
    # Without the gate the same stream trains every round.
    eng = AbsorberEngine(make_model("llama"), config=cfg.replace(surprise_gate=0.0))
    assert eng.absorb(chunk * 8).steps == 7 * 8


def test_the_losses_read_one_kept_cast_of_the_head_under_autocast():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4,
                                                                     compute_dtype="bfloat16"))
    runner, w = eng.runner, eng.runner.head.weight
    assert runner.head_weight() is w                         # outside autocast the GEMMs read the model's dtype
    with runner.autocast():
        cast = runner.head_weight()
        assert cast.dtype == torch.bfloat16 and torch.equal(cast, w.detach().to(torch.bfloat16))
        assert runner.head_weight() is cast                  # kept, not cast again
        with torch.no_grad():
            w.mul_(2.0)                                      # a changed head is cast again
        assert torch.equal(runner.head_weight(), w.detach().to(torch.bfloat16))
        with runner.model_dtype():
            assert runner.head_weight() is w


@pytest.mark.parametrize("compute_dtype", ["auto", "bfloat16"])
def test_a_float64_model_absorbs_in_float64_whatever_compute_dtype_asks(compute_dtype):
    """Autocast casts fp32 tensors only: a float64 model under a bf16 autocast met the kernels' casts
    to bf16 beside its float64 tensors (a dtype error in the first linear)."""
    eng = AbsorberEngine(make_model("llama").to(torch.float64),
                         config=AbsorberConfig(chunk_tokens=8, sync_tokens=4, rank=4, max_steps=3,
                                               compute_dtype=compute_dtype))
    assert eng.runner.compute_dtype is None
    report = eng.absorb(random_ids(20), flush=True)
    assert report.steps > 0 and not report.errors and all(math.isfinite(x) for x in report.round_losses)


def test_an_fp16_model_trains_on_a_hidden_loss_below_fp16s_range():
    # A hidden L1's gradient is weight/(N·L·D): 2.7e-8 for a SmolLM2 round of 2,048 positions, 6.5e-10
    # here (weight 1e-6 over this tiny model's 8 × 3 × 64), which fp16 rounds to zero. Before the
    # round's loss scale the delta's B stayed exactly zero: an fp16 round trained nothing.
    from absorber_engine.train import LossScale
    model = make_model("llama").half()
    cfg = AbsorberConfig(chunk_tokens=12, sync_tokens=8, rank=2, max_steps=3, probes=0, hidden_weight=1e-6,
                         kl_weight=0.0, ntp_weight=0.0, lr=1e-2)
    eng = AbsorberEngine(model, config=cfg)
    assert LossScale(eng.runner).value == 2.0 ** 16
    rep = eng.absorb(random_ids(20, seed=1))
    assert rep.steps == 3
    moved = max(float(b.detach().abs().max()) for b in eng.delta.B.values())
    assert moved > 1e-3, "the fp16 round left the delta where it started"
    assert LossScale(AbsorberEngine(make_model("llama"), config=cfg.replace(compute_dtype="float32")).runner).value == 1.0


def test_a_step_whose_scaled_gradients_overflow_is_skipped_and_the_scale_halved():
    from absorber_engine.train import LossScale, train_deltas
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=12, sync_tokens=8, rank=2))
    delta = eng.delta
    scale = LossScale(eng.runner)
    scale.value = 4.0
    calls = []

    def loss_fn(active):
        calls.append(scale.value)
        for p in delta.parameters():
            p.grad = torch.full_like(p, math.inf if len(calls) == 1 else 4.0)   # 1.0 once unscaled
        return [1.0]

    before = [p.detach().clone() for p in delta.parameters()]
    (res,) = train_deltas([delta], loss_fn, eng.config.replace(max_steps=3), scale=scale)
    assert res.error is None and res.steps == 2 and len(res.losses) == 3
    assert calls == [4.0, 2.0, 2.0]
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, delta.parameters()))
    def overflowing(active):
        for p in delta.parameters():
            p.grad = torch.full_like(p, math.inf)
        return [1.0]

    scale.value = 1.0                                  # at 1 an overflow is the round's failure, as before
    (res,) = train_deltas([delta], overflowing, eng.config, scale=scale)
    assert res.error is not None and "NaN or inf" in res.error


@pytest.mark.parametrize("objective", ["absorber", "ttt"])
def test_a_round_casts_each_frozen_weight_once(monkeypatch, objective):
    """Under bf16 autocast a round (teacher passes, every student forward and backward) casts each
    frozen target weight to bf16 once and reads that cast after, then holds none."""
    from absorber_kernels import frozen_linear

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=4, max_steps=3,
                                                                     compute_dtype="bfloat16", objective=objective))
    weights = {m.weight.data_ptr() for m in eng.runner.model.modules()
               if isinstance(m, torch.nn.Linear) and m is not eng.runner.head}
    made, real_to = [], torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: made.append(t.data_ptr()) or real_to(t, *a, **k))
    buffered = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, src, *a, **k: buffered.append(src.data_ptr()) or real_copy(t, src, *a, **k))
    report = eng.absorb(random_ids(24), flush=True)
    monkeypatch.undo()
    assert report.rounds == 1 and report.steps == 3
    casts = [p for p in made if p in weights]
    targets = {p for p in casts}
    assert targets and len(casts) == len(targets)                  # each weight read is cast once
    assert not [p for p in buffered if p in weights]               # and never again into the buffers
    assert frozen_linear._kept.casts is None


def test_a_last_step_that_blows_the_delta_up_is_read_and_the_round_rolled_back():
    # The loss a step reads is that of the delta before it: the last step's delta went unread, and a
    # step to |B| = 1e29 was committed (logits NaN, every later round of the stream failing).
    from absorber_engine import AbsorptionError

    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2, max_steps=1,
                                                                    future_tokens=4, lr=1e29))
    before = {k: v.clone() for k, v in eng.delta.state_dict().items()}
    with pytest.raises(AbsorptionError, match="after step 1"):
        eng.absorb(random_ids(24, seed=1))
    assert all(torch.equal(v, eng.delta.state_dict()[k]) for k, v in before.items())
    assert torch.isfinite(eng.logits([3, 4, 5])).all()


def test_streams_that_ran_out_of_steps_are_read_once_more_and_fail_there():
    from absorber_engine.lora import LowRankDelta
    from absorber_engine.train import train_deltas

    cfg = AbsorberConfig(max_steps=2, lr=1e-2, stop_loss=0.5)
    deltas = [LowRankDelta({"w": (4, 4)}, 2, 1.0, torch.device("cpu"), seed=s) for s in range(2)]

    def loss_fn(active):                  # stream 1 is below stop_loss at once: it takes no step
        for i in active:
            (deltas[i].A["w"].sum() + deltas[i].B["w"].sum()).backward()
        return [1.0 if i == 0 else 0.1 for i in active]

    read = []
    res = train_deltas(deltas, loss_fn, cfg, final_fn=lambda active: read.append(list(active)) or [0.9] * len(active))
    assert read == [[0]] and res[0].losses == [1.0, 1.0] and res[1].losses == [0.1]      # one a step, as before
    assert (res[0].read_after, res[0].final_loss, res[1].read_after) == (0.9, 0.9, None) and res[0].error is None
    res = train_deltas(deltas[:1], loss_fn, cfg, final_fn=lambda active: [float("nan")])
    assert res[0].error == "the sync loss became nan after step 2"

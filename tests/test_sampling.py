"""The C++ draw behind sampling (sampling.py): the same ids as torch.multinomial, the generator left
in the same state; and the once-a-process check that guards it fails on a draw that is off."""

import pytest
import torch

from absorber_engine import sampling


@pytest.mark.parametrize("before", [0, 1, 623, 624, 1000])
@pytest.mark.parametrize("shape", [(1, 1), (4, 32000), (3, 313), (2, 624)])
@pytest.mark.parametrize("sharpness", [0.1, 3.0, 30.0])
def test_the_draw_is_multinomial_and_leaves_the_generator_where_it_does(before, shape, sharpness):
    """Flat rows (every token's bound near the best: many logs) and peaked ones (few); `before`
    words used first (a float32 takes one): odd positions split a pair across a twist."""
    assert sampling._twister is not None, "the C++ extension is built by the install (setup.py)"
    probs = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(before)) * sharpness, -1)
    ours, theirs = torch.Generator().manual_seed(before + 7), torch.Generator().manual_seed(before + 7)
    for g in (ours, theirs):
        torch.rand(before, generator=g)
    for _ in range(3):
        assert torch.equal(sampling._draw(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
        assert torch.equal(ours.get_state(), theirs.get_state())
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


def test_rows_of_one_value_and_of_one_token_are_torchs():
    """Every token's bound near the best (one repeated value), one token with all the mass, every
    other token zero."""
    probs = torch.full((3, 2000), 1 / 2000)
    probs[1] = 0.0
    probs[1, 1234] = 1.0
    probs[2, ::2] = 0.0
    for seed in range(20):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sampling._draw(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])


def test_transposed_probabilities_and_no_rows_are_torchs():
    """torch fills q in probs' memory order, so a transposed probs pairs tokens with other draws;
    a (0, V) draw leaves the generator's bytes as they were."""
    probs = torch.softmax(torch.randn(40, 4, generator=torch.Generator().manual_seed(3)), 0).t()
    for rows in (probs, torch.empty(0, 7)):
        ours, theirs = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        assert torch.equal(sampling.multinomial_one(rows, ours), torch.multinomial(rows, 1, generator=theirs)[:, 0])
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_the_draw_refuses_what_it_cannot_read():
    key = torch.zeros(624, dtype=torch.int32).numpy().view("uint32")
    ids = torch.empty(2, dtype=torch.long).numpy()
    with pytest.raises(ValueError, match="C-contiguous float32"):
        sampling._twister.multinomial_from(key, 0, torch.ones(4, 2).t().numpy(), ids)
    with pytest.raises(ValueError, match="one id per row"):
        sampling._twister.multinomial_from(key, 0, torch.ones(3, 4).numpy(), ids)
    with pytest.raises(ValueError, match=r"pos must be in \[0, 624\]"):
        sampling._twister.multinomial_from(key, 625, torch.ones(2, 4).numpy(), ids)
    # rows torch.multinomial refuses gave ids -1 (negative values) and 0 (zeros), drawing words first
    before = key.copy()
    for row, message in ((-1.0, "negative, inf or NaN"), (float("nan"), "negative, inf or NaN"),
                         (float("inf"), "negative, inf or NaN"), (0.0, "no positive value")):
        probs = torch.ones(2, 5)
        probs[1] = row
        with pytest.raises(ValueError, match=message):
            sampling._twister.multinomial_from(key, 0, probs.numpy(), ids)
    assert (key == before).all()


def test_without_the_extension_tokens_come_from_torchs_own_draw(monkeypatch):
    monkeypatch.setattr(sampling, "_twister", None)
    monkeypatch.setattr(sampling, "_exact", None)
    monkeypatch.setattr(sampling, "_draw", lambda *a: pytest.fail("the C++ draw needs the extension"))
    probs = torch.softmax(torch.randn(3, 700, generator=torch.Generator().manual_seed(8)), -1)
    ours, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(sampling.multinomial_one(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
    assert torch.equal(ours.get_state(), theirs.get_state())


def test_tokens_and_state_are_multinomials_with_zeros_and_the_default_generator():
    assert sampling._matches_torch()
    for seed in range(40):
        probs = torch.softmax(torch.randn(4, 1000, generator=torch.Generator().manual_seed(seed)) * 4, -1)
        probs[:, ::3] = 0.0                           # a nucleus leaves zeros
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        assert torch.equal(sampling.multinomial_one(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])
        assert torch.equal(ours.get_state(), theirs.get_state())
    torch.manual_seed(3)
    want = torch.multinomial(probs, 1)[:, 0], torch.rand(3)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip((sampling.multinomial_one(probs), torch.rand(3)), want))


def test_fp64_probabilities_take_torchs_own_draw(monkeypatch):
    monkeypatch.setattr(sampling, "_draw", lambda *a: pytest.fail("C++ draw used"))
    probs = torch.softmax(torch.randn(2, 50), -1)
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = sampling.multinomial_one(probs.double(), ours)
    assert torch.equal(got, torch.multinomial(probs.double(), 1, generator=theirs)[:, 0])


@pytest.mark.parametrize("off", ["one word later", "a neighbour's id"])
def test_the_check_refuses_a_draw_that_is_off(monkeypatch, off):
    draw = sampling._draw

    def wrong(probs, g):
        if off == "one word later":
            torch.rand(1, generator=g)
            return draw(probs, g)
        ids = draw(probs, g)
        return (ids + 1) % probs.shape[1]

    monkeypatch.setattr(sampling, "_draw", wrong)
    assert not sampling._check()
    monkeypatch.setattr(sampling, "_draw", draw)
    assert sampling._check()
    monkeypatch.setattr(sampling, "_exact", False)                # such a torch samples with multinomial
    probs = torch.softmax(torch.randn(2, 50), -1)
    ours, theirs = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(sampling.multinomial_one(probs, ours), torch.multinomial(probs, 1, generator=theirs)[:, 0])


def test_minus_inf_logits_are_sampled_around_and_an_overflow_is_greedy():
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(4))
    logits[:, 10:20] = float("-inf")                  # masked tokens: probability 0, still a sample
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = sampling.sample_next(logits, 1.0, 1.0, ours)
    assert torch.equal(got, torch.multinomial(torch.softmax(logits, -1), 1, generator=theirs)[:, 0])
    assert not ((got >= 10) & (got < 20)).any()
    assert torch.equal(sampling.sample_next(logits, 1e-300, 1.0, ours), logits.argmax(-1))


def test_threads_drawing_from_their_own_generators_get_their_own_draws():
    from concurrent.futures import ThreadPoolExecutor

    probs = torch.softmax(torch.randn(4, 5000, generator=torch.Generator().manual_seed(6)), -1)

    def tokens(seed, draw):
        g = torch.Generator().manual_seed(seed)
        return torch.stack([draw(g) for _ in range(30)])

    want = [tokens(s, lambda g: torch.multinomial(probs, 1, generator=g)[:, 0]) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda s: tokens(s, lambda g: sampling.multinomial_one(probs, g)), range(4)))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_threads_sharing_one_generator_take_its_draws_one_at_a_time():
    """Every draw reads, advances and writes back the one generator's state: two threads drawing from
    it share out the tokens of 2 x 40 draws made in a row, and leave it where those leave it."""
    from concurrent.futures import ThreadPoolExecutor

    probs = torch.softmax(torch.randn(2, 20000, generator=torch.Generator().manual_seed(10)) * 3, -1)
    alone = torch.Generator().manual_seed(11)
    want = sorted(tuple(torch.multinomial(probs, 1, generator=alone)[:, 0].tolist()) for _ in range(80))
    shared = torch.Generator().manual_seed(11)
    with ThreadPoolExecutor(2) as pool:
        got = pool.map(lambda _: [tuple(sampling.multinomial_one(probs, shared).tolist()) for _ in range(40)], range(2))
        got = sorted(t for part in got for t in part)
    assert got == want
    assert torch.equal(shared.get_state(), alone.get_state())


@pytest.mark.parametrize("temperature, top_p", [(0.7, 0.9), (1.0, 0.5), (1.3, 0.95)])
def test_the_nucleus_is_the_one_generates_warpers_keep(temperature, top_p):
    """Op for op as generate(): its temperature and top-p warpers, then softmax. Summed from the top
    instead, the float32 nucleus differs by a token in about 1 row of 90 at this vocabulary."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(400, 49152, generator=torch.Generator().manual_seed(12)) * 3
    scores = logits if temperature == 1.0 else TemperatureLogitsWarper(temperature)(None, logits)
    want = torch.softmax(TopPLogitsWarper(top_p)(None, scores), dim=-1)
    assert torch.equal(sampling.next_token_probs(logits, temperature, top_p), want)

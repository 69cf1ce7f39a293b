"""The vectorized draw behind sampling (sampling.py): the same q as exponential_, the generator left
in the same state, so the same tokens as torch.multinomial; and the once-a-process check that
guards it fails on a draw that is off by one rounding."""

import pytest
import torch

from absorber_engine import sampling


@pytest.mark.parametrize("words", ["C++", "numpy"])
@pytest.mark.parametrize("before", [0, 1, 623, 624, 1000])
@pytest.mark.parametrize("shape", [(1, 1), (4, 32000), (3, 313), (2, 624)])
def test_the_draw_is_exponential_and_leaves_the_generator_where_exponential_does(words, before, shape, monkeypatch):
    """Both sources of the Twister's words: the package's C++ loop, and numpy's where it is not built."""
    if words == "numpy":
        monkeypatch.setattr(sampling, "_twister", None)
    else:
        assert sampling._twister is not None, "the C++ extension is built by the install (setup.py)"
    ours, theirs = torch.Generator().manual_seed(before + 7), torch.Generator().manual_seed(before + 7)
    for g in (ours, theirs):              # `before` words used (a float32 takes one): odd positions split a pair
        torch.rand(before, generator=g)
    assert torch.equal(sampling.exponential_draw(shape, ours), torch.empty(shape).exponential_(generator=theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=theirs))


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
    monkeypatch.setattr(sampling, "exponential_draw", lambda *a: pytest.fail("vectorized draw used"))
    probs = torch.softmax(torch.randn(2, 50), -1)
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    got = sampling.multinomial_one(probs.double(), ours)
    assert torch.equal(got, torch.multinomial(probs.double(), 1, generator=theirs)[:, 0])


def test_the_check_refuses_a_draw_one_rounding_off(monkeypatch):
    draw = sampling.exponential_draw
    monkeypatch.setattr(sampling, "exponential_draw", lambda shape, g: torch.nextafter(draw(shape, g), torch.tensor(0.0)))
    assert not sampling._check()
    monkeypatch.setattr(sampling, "exponential_draw", draw)
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

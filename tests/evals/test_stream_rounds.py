"""run_stream's label of a document: the round that absorbed its last token (rounds ago is read from
it), even when one absorb() call runs several rounds."""

from absorber_engine import AbsorberConfig, AbsorberEngine
from evals.recall_eval import absorb_labelled
from tiny_models import make_model, random_ids


def test_a_document_is_labelled_with_the_round_that_finished_it_not_the_calls_last():
    eng = AbsorberEngine(make_model("llama"), config=AbsorberConfig(chunk_tokens=16, sync_tokens=8, rank=2,
                                                                    max_steps=1, future_tokens=4))
    ends, absorbed_at = [], []
    for n, seed in ((10, 1), (40, 2)):         # rounds of 16 tokens: 10 wait; 40 more run rounds 1 and 2
        ends.append((ends or [0])[-1] + n)
        absorbed_at.append(None)
        absorb_labelled(eng, random_ids(n, seed=seed), ends, absorbed_at, flush=False)
    assert eng.default.rounds == 2 and eng.absorbed_tokens == 32
    assert absorbed_at == [1, None]            # the first document's 10 tokens went in round 1
    absorb_labelled(eng, [], ends, absorbed_at, flush=True)
    assert absorbed_at == [1, eng.default.rounds] and eng.absorbed_tokens == 50

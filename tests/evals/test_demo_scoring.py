"""The base-model demo counts a reply right as the recall evaluation scores one: its truth as a whole
word of the first sentence, no other question's truth beside it."""

from evals.demo import correct


def test_the_demo_scores_whole_words_of_the_first_sentence_naming_one_truth():
    truths = ["12345", "67890"]
    assert correct(["12345", "67890"], truths) == 2
    assert correct(["123456", "67890."], truths) == 1                  # a substring test took 123456
    assert correct(["12345 or 67890", "I forget. 67890"], truths) == 0

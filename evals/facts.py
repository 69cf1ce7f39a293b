"""Seeded documents that state invented facts, and questions that ask them back in other words:
the recall evaluation of a real (instruction-tuned) model.

A document has a genre (note, memo, log, rules, recipe, itinerary), a title line, filler lines of
its genre, and `facts` statements at random places. Every fact's answer is invented (a made-up
name, place, word or a number of several digits), so a model that did not read the document
cannot know it: no-context accuracy is ~0. The question never repeats the statement's wording:
"The spare key is kept with Orlena Vask." is asked as "Who holds the spare key?".

Scoring (`score`): the answer must appear as a whole word in the first sentence of the model's
reply, case-insensitive, and no other answer of its kind from the same document may come before it
there (a reply that names another person first has said that person).
Draws that would make a question ambiguous are redrawn: an answer that shares a whole word with
another answer of its document or with its place, and a place already given to an earlier document
of the seed. Only a draw that collides is redrawn, so every other document is as it always was.
Everything depends only on (seed, index): the same seed gives the same documents on any machine.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

GENRES = ("note", "memo", "log", "rules", "recipe", "itinerary")

_SYL = ["ka", "lo", "mir", "ven", "tas", "rul", "bex", "no", "ria", "dun", "sel", "qua", "tor", "fen", "ilo",
        "mar", "zet", "pol", "ush", "gri", "dal", "om", "ter", "vy", "sha", "bri", "nek", "hol", "ari", "cus"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(syllables)).capitalize()


def _name(rng):
    return f"{_word(rng, 2)} {_word(rng, 2)}"


def _place(rng):
    return _word(rng, 3)


def _names(text: str, word: str) -> bool:
    """`word` as a whole word of `text`, case-insensitive: how score() finds an answer."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _clashes(word: str, taken) -> bool:
    """Either of `word` and one of `taken` names the other: score() could not tell them apart."""
    return any(_names(word, t) or _names(t, word) for t in taken)


_PLACES: dict[int, list[str]] = {}


def _place_name(seed: int, index: int) -> str:
    """Document `index`'s place: none of the seed's earlier documents has it, since a stream's
    questions tell its documents apart by their place alone."""
    places = _PLACES.setdefault(seed, [])
    while len(places) <= index:
        rng = random.Random(f"facts/{seed}/{len(places)}/place")
        where = _word(rng, 3)
        while _clashes(where, places):
            where = _word(rng, 3)
        places.append(where)
    return places[index]


def _number(rng):
    return str(rng.randint(1000, 9999))


# Each fact: (answer maker, statement template, question). {a} is the answer.
_FACTS = [
    (_name, "The spare key is kept by {a}.", "Who holds the spare key?"),
    (_name, "{a} is in charge of the budget.", "Which person is responsible for the budget?"),
    (_name, "The delivery will be signed for by {a}.", "Who signs for the delivery?"),
    (_place, "The team meets every Friday in {a}.", "In which town does the team gather on Fridays?"),
    (_place, "The old lighthouse stands near {a}.", "Near which place is the old lighthouse?"),
    (_place, "Our supplier ships everything from {a}.", "Where does the supplier send its goods from?"),
    (_number, "The code for the storage room is {a}.", "What number opens the storage room?"),
    (_number, "The guest wifi password is {a}.", "What is the password for the wifi used by guests?"),
    (_number, "The invoice number for the repair is {a}.", "Which invoice number belongs to the repair?"),
    (lambda r: _word(r, 3).lower(), "The secret ingredient is a spice called {a}.", "What is the name of the special spice?"),
    (lambda r: _word(r, 2), "The cat is named {a}.", "What do they call the cat?"),
    (lambda r: _word(r, 3), "The boat is called the {a}.", "What is the name of the boat?"),
]

_FILLER = {
    "note": ["Remember to water the plants on the balcony.", "The kettle is still broken, so use the small pot.",
             "Lunch is usually around one.", "Please close the windows when it rains.",
             "The neighbours are friendly but quiet."],
    "memo": ["All staff should read this before the next meeting.", "Expenses must be filed within two weeks.",
             "The printer on the second floor is being replaced.", "Questions can go to the front desk.",
             "Thank you for your patience during the move."],
    "log": ["08:00 systems checked, nothing unusual.", "09:30 weather clear, light wind from the west.",
            "11:15 routine inspection completed.", "13:40 radio contact confirmed.", "15:05 supplies counted."],
    "rules": ["Shoes stay at the door.", "Quiet hours start at ten in the evening.", "Guests must sign in.",
              "Food is not allowed in the reading room.", "Report any damage the same day."],
    "recipe": ["Chop two onions finely.", "Warm the oil in a heavy pan.", "Stir gently for five minutes.",
               "Season with salt and pepper to taste.", "Let it rest before serving."],
    "itinerary": ["Breakfast is served at half past seven.", "The bus leaves from the main square.",
                  "Bring comfortable shoes for the walk.", "The afternoon is free for shopping.",
                  "Dinner is booked at a small family restaurant."],
}
_TITLES = {"note": "Note for the house-sitter", "memo": "Memo to all staff", "log": "Station log",
           "rules": "House rules", "recipe": "Family stew recipe", "itinerary": "Trip itinerary"}


@dataclass
class FactDocument:
    genre: str
    text: str
    questions: list[str]
    answers: list[str]


def make_document(seed: int, index: int, facts: int = 4, filler_lines: int = 4,
                  place: bool = False) -> FactDocument:
    """Document `index` of the set drawn with `seed`: `facts` invented facts among filler lines.

    place: the document is about one invented place, named in its title, in every statement and in
    every question ("At Dunomvy, the code for the storage room is 9007." / "At Dunomvy, what number
    opens the storage room?"). Streams need it: documents of a stream share fact kinds, and a
    question must say which document it asks about. The place is drawn apart from the facts, so a
    document's facts are the same with or without it, but for an answer that would share a word
    with the place (a question that names its answer), redrawn."""
    rng = random.Random(f"facts/{seed}/{index}")
    where = _place_name(seed, index) if place else None
    genre = GENRES[index % len(GENRES)]
    chosen = rng.sample(_FACTS, facts)
    answers, statements, questions = [], [], []
    for make, statement, question in chosen:
        a = make(rng)
        while _clashes(a, answers + ([where] if where else [])):
            a = make(rng)
        answers.append(a)
        names_first = statement.startswith("{a}")            # a name keeps its capital
        statement = statement.format(a=a)
        if where:
            statement = f"At {where}, {statement if names_first else statement[0].lower() + statement[1:]}"
            question = f"At {where}, {question[0].lower()}{question[1:]}"
        statements.append(statement)
        questions.append(question)
    lines = rng.sample(_FILLER[genre], min(filler_lines, len(_FILLER[genre])))
    for s in statements:
        lines.insert(rng.randint(0, len(lines)), s)
    title = _TITLES[genre] + (f" ({where})" if where else "")
    text = title + "\n" + "\n".join(lines) + "\n"
    return FactDocument(genre, text, questions, answers)


def score(reply: str, answer: str, others: Sequence[str] = ()) -> bool:
    """The answer as a whole word of the reply's first sentence, case-insensitive. Only the first
    sentence: a model that recites a memorized document after its answer must not get credit for a
    fact it happened to name further on. `others`, the other answers of the document (the answer
    itself may be among them): where the first sentence names another person before the person
    asked, it has said that one ("held by Neklo Rulno, the head of the Nekvy Tassel") and is
    wrong, as is a choice ("4821 or 7710"); likewise for numbers. Answers of other kinds, or named
    after it, are context ("signed for by the owner of the Kaquamar, Mirtas Vynek"). An answer
    that is part of the asked one ("Quamir" of "Quamir Ilomir") is named with it; one that holds it
    is another answer."""
    first = re.split(r"(?<=[.!?])\s|\n", reply.strip(), maxsplit=1)[0]
    at = _position(first, answer)
    if at is None:
        return False
    # One-word answers (a place, a boat, a cat, a spice) are of kinds their form does not tell
    # apart, and a reply names them as context ("The Polquafen is a small boat called the
    # Zetmirmir"): only persons and numbers are checked against their kind.
    rivals = [o for o in others if not _names(answer, o)
              and ((_kind(o) == _kind(answer) != "word") or _names(o, answer))]
    for other in rivals:
        where = _position(first, other)
        if where is not None and (where <= at or re.search(r"(?<!\w)or(?!\w)", first[at:where], re.IGNORECASE)):
            return False
    return True


def _position(text: str, word: str) -> int | None:
    found = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE)
    return None if found is None else found.start()


def _kind(answer: str) -> str:
    """What a fact's answer is, from its form (_FACTS draws persons as two words, numbers as
    digits, every other answer as one word)."""
    return "number" if answer.isdigit() else "person" if " " in answer.strip() else "word"

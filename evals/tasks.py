"""Seeded generators of long-context tasks: the training data of the shipped model and the
examples of the evaluation harness.

Each task follows its published definition, with our own text:

- ``passkey`` (Mohtashami & Jaggi 2023, "Landmark Attention"): the same five filler sentences
  repeated, one line "The pass key is N. Remember it. N is the pass key." at a random depth,
  then "What is the pass key? The pass key is". N has 5 digits.
- ``niah_single``, ``niah_multikey``, ``niah_multivalue`` (RULER, Hsieh et al. 2024): needles
  "One of the special magic numbers for {key} is: {value}." in an essay-like haystack; keys
  are adjective-noun words, values 7-digit numbers. single: one needle. multikey: up to 4
  needles with different keys, one is asked (the rest are distractors). multivalue: up to 4
  needles with the same key, every value must be returned.
- ``kv_recall`` (after "Lost in the Middle", Liu et al. 2023, with short word keys): a list
  of records '"key": value', one per line, keys two quoted words ("amber falcon"); the value
  of one key is asked. Values have 5 digits.
- ``doc_lm``: a document that states facts early (locker codes, variable assignments, home
  towns), then essay text, then ``target``: later text that refers back to those facts. The
  metric is the LM loss on ``target``; ``answers`` are the recalled values inside it.

Conventions (what the engine and the harness rely on):
- The prompt is ``context + query``; ``context`` always ends with a newline, so the query
  starts a line of its own. The expected continuation is ``" " + answer`` (one space, then
  the value); for niah_multivalue the values are joined by ", " in the order they appear in
  the context. For doc_lm ``query`` is "" and ``target`` directly follows ``context``.
- Length: ``context + query + target`` is ``n_tokens`` tokens under the given tokenizer
  (counted without special tokens), to within about one filler sentence (a few %; at most
  ~12 tokens at the smallest sizes). Fillers scale from ~64 to 64k+ tokens; needles sit at a
  random depth strictly inside the context. Tasks with several needles use fewer of them
  when the budget cannot hold 4.
- Determinism: every random choice comes from ``random.Random`` seeded by a string built from
  (task, seed, purpose), so an example depends only on (task, n_tokens, tokenizer, seed), and
  the same seed asks the same question at every length (needles and depth do not depend on
  n_tokens; only the filler does).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Protocol

TASKS: tuple[str, ...] = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "kv_recall", "doc_lm")
RETRIEVAL_TASKS: tuple[str, ...] = TASKS[:5]
"""The tasks scored by greedy decoding (doc_lm is scored by loss)."""


@dataclass
class Example:
    task: str
    context: str
    """The long part: absorbed by the engine, or held in full context by baselines."""
    query: str
    """Asked right after the context (the prompt is context + query)."""
    answers: list[str]
    """Expected continuation(s), without the leading space; niah_multivalue: all of them."""
    target: str = ""
    """doc_lm: the later text whose LM loss is measured; "" for the other tasks."""
    more: list[tuple[str, list[str]]] = field(default_factory=list)
    """Further (query, answers) pairs about the same context, only when make_example is asked
    for n_queries > 1 (training uses them to put more answer tokens in each sequence). They
    are not counted in n_tokens."""


class _Tokenizer(Protocol):
    def encode(self, text: str, *args, **kwargs) -> list[int]: ...


# --------------------------------------------------------------------------- word material
# Hand-written lists: the haystack must read like prose without shipping any corpus.

ADJECTIVES = (
    "amber ancient bitter brave bright broken calm careful clever cold crimson curious damp "
    "dark distant dusty eager early empty faint fancy fierce flat fragile gentle golden grand "
    "green grey hidden hollow humble icy idle jolly keen large lazy little lively loud lucky "
    "mellow merry misty modern narrow neat noble odd old orange pale patient plain polite "
    "proud purple quick quiet rapid rare rough round royal rusty sandy scarlet secret sharp "
    "shiny short silent silver simple sleepy slow small smooth soft solid sour steady steep "
    "stormy strange sturdy sunny swift tall tame tender tidy tiny upper vast velvet warm wary "
    "weary wide wild windy wise wooden young"
).split()

NOUNS = (
    "anchor apple arch badge basket beacon bell bench blanket boat bottle bridge bucket cabin "
    "candle canyon carpet castle cellar chair chimney clock cloud compass cottage crown "
    "cupboard curtain desk dragon drum eagle engine falcon feather fence fiddle forest fountain "
    "garden gate glacier hammer harbor helmet hill island jacket kettle ladder lake lantern "
    "lemon library lighthouse lizard magnet mantle meadow mirror mountain needle orchard otter "
    "oven owl paddle palace parrot pebble pencil pepper piano pillow planet pocket pond "
    "puzzle quarry rabbit raven ribbon river rocket saddle sail scarf shelf shovel signal "
    "spoon stable statue stone suitcase sundial tablet teapot temple thistle tiger tower "
    "trumpet tunnel turtle umbrella valley violin wagon wallet whistle window wizard yard"
).split()

NAMES = (
    "Alice Bruno Carla Dmitri Elena Farid Greta Hugo Irene Jonas Keiko Liam Marta Nadia Oscar "
    "Priya Quentin Rosa Samuel Tara Umar Vera Walter Ximena Yusuf Zoe"
).split()

CITIES = (
    "Lisbon Oslo Dublin Vienna Prague Lima Quito Cairo Nairobi Hanoi Osaka Perth Denver Austin "
    "Boston Madrid Porto Geneva Krakow Tallinn Bergen Malmo Leeds Cardiff"
).split()

ITEMS = ("locker code", "room number", "badge number", "desk number", "door code", "ticket number")

VERBS = (
    "admired built carried cleaned described found followed guarded measured mended moved "
    "painted polished praised repaired studied visited watched"
).split()

PEOPLE = "farmers sailors students travelers painters builders teachers merchants children poets".split()

PLACES = "village harbor valley market square old town library garden hillside river bank".split(" ")

# Essay-like sentence templates. {a}: adjective, {n}/{m}: nouns, {v}: past verb, {p}: people,
# {c}: city, {x}: a small number (kept rare so numbers mostly mean needles).
_ESSAY = (
    "The {a} {n} stood beside the {m} for many years.",
    "Most {p} in {c} {v} the {n} at least once.",
    "Nobody could say why the {n} looked so {a} that morning.",
    "In the evening the {p} {v} the {a} {m}.",
    "It is often said that a {a} {n} is worth more than a {m}.",
    "The road to {c} passed a {a} {n} and an old {m}.",
    "Every spring, the {p} {v} a {n} near the {m}.",
    "There was a {a} {n} on the hill above {c}.",
    "Some {p} believe the {n} was once {a}.",
    "The story of the {a} {n} is still told in {c}.",
    "After the storm, the {n} seemed {a} and the {m} was gone.",
    "A {a} wind moved across the {n}.",
    "The {p} of {c} kept a {n} in every house.",
    "Later that year, someone {v} the {a} {m}.",
    "The {n} was heavy, so the {p} left it by the {m}.",
    "On quiet days the {m} looked {a}.",
    "Few {p} remember the {a} {n} of {c}.",
    "They {v} the {n} and then rested.",
    "A good {n} needs a {a} {m}.",
    "The old map showed a {n}, a {m} and a {a} path.",
)

# The passkey filler, verbatim as the published task uses it.
PASSKEY_FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


# --------------------------------------------------------------------------- helpers


def _rng(task: str, seed: int, purpose: str) -> random.Random:
    # str seeds are hashed with sha512 by random.Random: stable across runs and processes.
    return random.Random(f"absorber-tasks/{task}/{seed}/{purpose}")


def _counter(tokenizer: _Tokenizer) -> Callable[[str], int]:
    def count(text: str) -> int:
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a plain tokenizers.Tokenizer or a minimal stand-in
            ids = tokenizer.encode(text)
            return len(getattr(ids, "ids", ids))

    return count


def _number(rng: random.Random, digits: int, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if value not in taken:
            taken.add(value)
            return value


def _word_key(rng: random.Random, taken: set[str], sep: str = "-") -> str:
    while True:
        key = f"{rng.choice(ADJECTIVES)}{sep}{rng.choice(NOUNS)}"
        if key not in taken:
            taken.add(key)
            return key


def _essay_sentence(rng: random.Random) -> str:
    n, m = rng.sample(NOUNS, 2)
    text = rng.choice(_ESSAY).format(
        a=rng.choice(ADJECTIVES), n=n, m=m, v=rng.choice(VERBS), p=rng.choice(PEOPLE), c=rng.choice(CITIES)
    )
    return re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)  # "a eager" -> "an eager"


class _Filler:
    """An endless, seeded stream of filler units, generated lazily and kept so that asking for
    more units never changes the earlier ones."""

    def __init__(self, make: Callable[[int], str]):
        self._make = make
        self._units: list[str] = []

    def take(self, k: int) -> list[str]:
        while len(self._units) < k:
            self._units.append(self._make(len(self._units)))
        return self._units[:k]


def _insert(units: list, needles: list[tuple[float, object]]) -> list:
    """Places each (depth, needle) between filler units: depth 0 is the start, 1 the end."""
    out = list(units)
    # Insert from the deepest so earlier insertions do not shift later positions.
    for depth, text in sorted(needles, key=lambda d: -d[0]):
        out.insert(round(depth * len(units)), text)
    return out


def _fit(n_tokens: int, count: Callable[[str], int], render: Callable[[int], str], unit_tokens: float) -> int:
    """Number of filler units k such that count(render(k)) is closest to n_tokens.

    Starts from the token count of the fixed parts and the mean size of a unit, then corrects
    with a few exact counts (joining text is not exactly additive under every tokenizer)."""
    base = count(render(0))
    k = max(0, round((n_tokens - base) / unit_tokens))
    best_k, best_err = 0, abs(base - n_tokens)
    seen: set[int] = {0}
    for _ in range(12):
        if k in seen:
            break
        seen.add(k)
        total = count(render(k))
        err = abs(total - n_tokens)
        if err < best_err:
            best_k, best_err = k, err
        per_unit = max((total - base) / k, 1.0) if k else unit_tokens
        step = round((n_tokens - total) / per_unit)
        if step == 0:
            step = 1 if total < n_tokens else -1
        k = max(0, k + step)
    return best_k


def _unit_tokens(filler: _Filler, count: Callable[[str], int], sep: str) -> float:
    sample = filler.take(16)
    return max(count(sep.join(sample)) / len(sample), 1.0)


# --------------------------------------------------------------------------- the tasks


def _passkey(n_tokens: int, count, seed: int):
    rng = _rng("passkey", seed, "needle")
    key = _number(rng, 5, set())
    depth = rng.random()
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    intro = (
        "There is an important piece of information hidden inside a lot of irrelevant text. "
        "Find it and remember it. I will ask you about it later."
    )
    query = "What is the pass key? The pass key is"
    filler = _Filler(lambda i: PASSKEY_FILLER[i % len(PASSKEY_FILLER)])
    use_intro = n_tokens >= 192  # the intro would crowd out the haystack of a tiny prompt

    def context(k: int) -> str:
        body = " ".join(_insert(filler.take(k), [(depth, needle)]))
        return (intro + "\n" if use_intro else "") + body + "\n"

    k = _fit(n_tokens, count, lambda k: context(k) + query, _unit_tokens(filler, count, " "))
    return context(k), [(query, [key])], ""


def _niah(task: str, n_tokens: int, count, seed: int):
    rng = _rng(task, seed, "needles")
    keys: set[str] = set()
    values: set[str] = set()
    filler = _Filler(lambda i, r=_rng(task, seed, "filler"): _essay_sentence(r))
    unit = _unit_tokens(filler, count, " ")

    def needle(key: str, value: str) -> str:
        return f"One of the special magic numbers for {key} is: {value}."

    # Up to 4 needles; fewer when they would take more than ~half the budget.
    first = needle("quiet-harbor", "1234567")
    per_needle = count(" " + first) + 1
    n_needles = 1 if task == "niah_single" else max(1, min(4, int(0.5 * n_tokens // per_needle)))

    if task == "niah_multivalue":
        key = _word_key(rng, keys)
        pairs = [(key, _number(rng, 7, values)) for _ in range(4)][:n_needles]
    else:
        pairs = [(_word_key(rng, keys), _number(rng, 7, values)) for _ in range(4)][:n_needles]
    depths = [rng.random() for _ in range(4)][:n_needles]
    order = rng.sample(range(4), 4)  # which needle(s) get asked, in order
    asked = [i for i in order if i < n_needles]

    if task == "niah_multivalue":
        key = pairs[0][0]
        # Values in the order they appear in the context.
        in_order = [v for _, v in sorted(zip(depths, (v for _, v in pairs)), key=lambda dv: dv[0])]
        qas = [(f"What are all the special magic numbers for {key}? The special magic numbers for {key} are", in_order)]
    else:
        qas = [
            (f"What is the special magic number for {pairs[i][0]}? The special magic number for {pairs[i][0]} is", [pairs[i][1]])
            for i in asked
        ]
    query = qas[0][0]

    def context(k: int) -> str:
        return " ".join(_insert(filler.take(k), [(d, needle(*p)) for d, p in zip(depths, pairs)])) + "\n"

    k = _fit(n_tokens, count, lambda k: context(k) + query, unit)
    return context(k), qas, ""


def kv_record(key: str, value: str) -> str:
    """One kv_recall line. The key is quoted, and quoted again in the question, so its words
    are the same tokens in both places: unquoted at the start of a line, "amber" and
    " amber" are different tokens, and a small model then matched the noun alone (every miss
    of our first model was the value of a key with the same noun)."""
    return f'"{key}": {value}\n'


def kv_question(key: str) -> str:
    return f'What is the value of "{key}"? The value of "{key}" is'


def _kv_recall(n_tokens: int, count, seed: int, n_queries: int):
    rng = _rng("kv_recall", seed, "records")
    keys: set[str] = set()
    values: set[str] = set()
    header = "Below is a list of records. Each line gives a key and its value.\n"
    # The asked key's record sits at a fixed depth; the other records are the filler.
    asked = (_word_key(rng, keys, " "), _number(rng, 5, values))
    depth = rng.random()
    others = _Filler(lambda i: (_word_key(rng, keys, " "), _number(rng, 5, values)))
    query = kv_question(asked[0])

    def context(k: int) -> str:
        return header + "".join(kv_record(*kv) for kv in _insert(others.take(k), [(depth, asked)]))

    unit = max(count("".join(kv_record(*kv) for kv in others.take(16))) / 16, 1.0)
    k = _fit(n_tokens, count, lambda k: context(k) + query, unit)
    qas = [(query, [asked[1]])]
    if n_queries > 1:  # further questions about other records of the same list
        pool = others.take(k)
        picks = _rng("kv_recall", seed, "more").sample(range(len(pool)), min(n_queries - 1, len(pool)))
        qas += [(kv_question(pool[i][0]), [pool[i][1]]) for i in picks]
    return context(k), qas, ""


# Facts of doc_lm: (statement, later reference, value). {s}: subject, {v}: value.
_FACTS = (
    ("{s}'s {i} is {v}.", "{s} checked the {i} once more, and it was still {v}.", "item"),
    ("Let {s} = {v}.", "Evaluating {s} again gives {v}.", "var"),
    ("{s} lives in {v}.", "As noted before, {s} lives in {v}.", "city"),
)


def _variable(rng: random.Random, taken: set[str]) -> str:
    """A variable no earlier fact of the document set: one set twice makes its references ambiguous.
    Only a taken name is drawn again, so documents without one are as they always were."""
    while True:
        name = f"{rng.choice('abcdkmnpqxyz')}{rng.randrange(10)}"
        if name not in taken:
            taken.add(name)
            return name


def _doc_lm(n_tokens: int, count, seed: int):
    rng = _rng("doc_lm", seed, "facts")
    filler = _Filler(lambda i, r=_rng("doc_lm", seed, "filler"): _essay_sentence(r))
    unit = _unit_tokens(filler, count, " ")
    n_facts = max(1, min(6, n_tokens // 40))
    people = rng.sample(NAMES, n_facts)
    facts: list[tuple[str, str, str]] = []  # (statement, reference, value)
    values: set[str] = set()
    variables: set[str] = set()
    for j in range(n_facts):
        kind = rng.choice(_FACTS)
        if kind[2] == "item":
            subj, item, value = people[j], rng.choice(ITEMS), _number(rng, 4, values)
        elif kind[2] == "var":
            subj, item = _variable(rng, variables), ""
            value = _number(rng, rng.choice((2, 3)), values)
        else:
            subj, item, value = people[j], "", rng.choice(CITIES)
        facts.append((kind[0].format(s=subj, i=item, v=value), kind[1].format(s=subj, i=item, v=value), value))
    asked = rng.sample(range(n_facts), n_facts)  # referred back to in this order
    # The document: facts first, essay text, then the target. The target holds the references
    # interleaved with essay text; it takes about a quarter of the budget.
    tail = _Filler(lambda i, r=_rng("doc_lm", seed, "tail"): _essay_sentence(r))
    target_budget = max(n_tokens // 4, sum(count(" " + facts[i][1]) for i in asked) + 2)

    def target(k: int) -> str:
        parts = _insert(tail.take(k), [((j + 0.5) / n_facts, facts[i][1]) for j, i in enumerate(asked)])
        return " ".join(parts) + "\n"

    kt = _fit(target_budget, count, target, unit)

    def context(k: int) -> str:
        return " ".join([f[0] for f in facts] + filler.take(k)) + "\n"

    k = _fit(n_tokens, count, lambda k: context(k) + target(kt), unit)
    return context(k), [("", [facts[i][2] for i in asked])], target(kt)


def make_example(task: str, n_tokens: int, tokenizer: _Tokenizer, seed: int, n_queries: int = 1) -> Example:
    """One example of ``task`` whose context + query (+ target) is ~n_tokens tokens.

    ``tokenizer``: anything with ``encode(text)`` (a Hugging Face tokenizer, a
    ``tokenizers.Tokenizer``); it is only used to count tokens. ``n_queries`` > 1 fills
    ``Example.more`` with further questions about the same context where the task has them
    (kv_recall, niah_multikey); the main query and answers do not change with it."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if n_tokens < 32:
        raise ValueError(f"n_tokens must be at least 32, got {n_tokens}")
    count = _counter(tokenizer)
    if task == "passkey":
        context, qas, target = _passkey(n_tokens, count, seed)
    elif task.startswith("niah_"):
        context, qas, target = _niah(task, n_tokens, count, seed)
    elif task == "kv_recall":
        context, qas, target = _kv_recall(n_tokens, count, seed, n_queries)
    else:
        context, qas, target = _doc_lm(n_tokens, count, seed)
    (query, answers), more = qas[0], qas[1:n_queries]
    return Example(task=task, context=context, query=query, answers=list(answers), target=target, more=list(more))


def answer_text(answers: list[str]) -> str:
    """The continuation a perfect model writes after the query: " " + the value(s)."""
    return " " + ", ".join(answers)


def score(example: Example, generated: str, answers: list[str] | None = None) -> float:
    """1.0 if the generated continuation states the answer, else 0.0; niah_multivalue: the
    fraction of its values found. Only the first non-empty line is read (the model answers on
    the query's line), except for doc_lm, whose answers may be anywhere in the generation.
    A value counts only as a whole word ("12345" is not found in "123456").
    ``answers`` overrides ``example.answers`` (to score one of ``example.more``)."""
    answers = example.answers if answers is None else answers
    if not answers:
        return 0.0
    text = generated.strip()
    if example.task != "doc_lm":
        text = text.split("\n", 1)[0]
    found = sum(1 for a in answers if re.search(rf"(?<!\w){re.escape(a)}(?!\w)", text))
    return found / len(answers)

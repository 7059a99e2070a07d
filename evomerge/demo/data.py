"""Synthetic data for the demo world: English, a second made-up language "b", facts, arithmetic.

Everything here is pure Python and deterministic: the language itself (the English -> b word map)
is fixed by a constant, so task files and models built with any seed share one vocabulary; the
``seed`` arguments only decide how items are split and how training corpora are sampled.

Vocabulary is word-level: every whitespace-separated word is one token, which keeps sequences
short (about 10-20 tokens) so that models train in seconds on a CPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

LANG_SEED = 20240611  # fixes the b lexicon; never change it without bumping the world version

NUMBERS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
]  # fmt: skip

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("old", "young"), ("happy", "sad"),
    ("light", "dark"), ("good", "bad"), ("long", "short"), ("high", "low"), ("full", "empty"),
    ("rich", "poor"), ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"), ("early", "late"),
    ("thick", "thin"),
]  # fmt: skip

COLOURS_OF = [
    ("sky", "blue"), ("grass", "green"), ("snow", "white"), ("sun", "yellow"), ("blood", "red"),
    ("night", "black"), ("coal", "black"), ("milk", "white"), ("banana", "yellow"),
    ("leaf", "green"), ("tomato", "red"), ("sea", "blue"), ("cloud", "white"),
    ("carrot", "orange"), ("chocolate", "brown"), ("mud", "brown"), ("cherry", "red"),
    ("lemon", "yellow"), ("frog", "green"), ("crow", "black"),
]  # fmt: skip

LEGS_OF = [
    ("dog", 4), ("cat", 4), ("bird", 2), ("spider", 8), ("fish", 0), ("ant", 6), ("snake", 0),
    ("person", 2), ("horse", 4), ("duck", 2), ("bee", 6), ("cow", 4), ("worm", 0), ("crab", 10),
    ("octopus", 8), ("chicken", 2), ("beetle", 6), ("goat", 4), ("mouse", 4), ("lion", 4),
]  # fmt: skip

SOUNDS_OF = [
    ("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa"),
    ("snake", "hiss"), ("bee", "buzz"), ("lion", "roar"), ("horse", "neigh"), ("owl", "hoot"),
    ("mouse", "squeak"), ("pig", "oink"), ("frog", "croak"), ("crow", "caw"),
]  # fmt: skip

COLOURS = ["red", "blue", "green", "white", "yellow", "black", "orange", "brown"]
OBJECTS = ["car", "ball", "hat", "cup", "box", "door", "book", "chair", "bag", "shoe", "bed", "pen"]
ANIMALS = sorted({a for a, _ in LEGS_OF} | {a for a, _ in SOUNDS_OF})
NAMES = ["tom", "ann", "bob", "eva", "max", "lily"]

# Question templates. "X"/"Y" are slots; "Q:" / "A:" are structural markers shared by both
# languages (like punctuation), every other word is translated into b.
QA_TEMPLATES = {
    "opposite": [
        "Q: what is the opposite of X ? A:",
        "Q: the opposite of X is what ? A:",
        "Q: tell me the opposite of X ? A:",
        "Q: X is the opposite of what ? A:",
    ],
    "colour": [
        "Q: what is the colour of the X ? A:",
        "Q: what colour is the X ? A:",
        "Q: the X is what colour ? A:",
        "Q: tell me the colour of the X ? A:",
    ],
    "legs": [
        "Q: how many legs does a X have ? A:",
        "Q: a X has how many legs ? A:",
        "Q: what number of legs does a X have ? A:",
        "Q: tell me how many legs a X has ? A:",
    ],
    "sound": [
        "Q: what does a X say ? A:",
        "Q: a X says what ? A:",
        "Q: what sound does a X make ? A:",
        "Q: tell me what a X says ? A:",
    ],
    "plus": [
        "Q: what is X plus Y ? A:",
        "Q: how much is X plus Y ? A:",
        "Q: X plus Y is what ? A:",
        "Q: tell me X plus Y ? A:",
    ],
    "minus": [
        "Q: what is X minus Y ? A:",
        "Q: how much is X minus Y ? A:",
        "Q: X minus Y is what ? A:",
        "Q: tell me X minus Y ? A:",
    ],
}

MARKERS = ["Q:", "A:", "?", "|", "."]

_CONS = "bdfgklmnprstvz"
_VOWS = "aeiou"


def _english_words() -> list[str]:
    words: set[str] = set(NUMBERS)
    for a, b in OPPOSITES:
        words |= {a, b}
    for n, c in COLOURS_OF:
        words |= {n, c}
    for n, _ in LEGS_OF:
        words.add(n)
    for n, s in SOUNDS_OF:
        words |= {n, s}
    words |= set(COLOURS) | set(OBJECTS) | set(NAMES)
    for tmpls in QA_TEMPLATES.values():
        for t in tmpls:
            words |= {w for w in t.split() if w not in MARKERS and w not in ("X", "Y")}
    for s in _SENTENCE_TEMPLATES + _FACT_TEMPLATES_ALL:
        words |= {w for w in s.split() if w.isalpha() and w.islower()}
    return sorted(words)


_SENTENCE_TEMPLATES = [
    "i see N C A",
    "you have N C O",
    "there are N A in the house",
    "the A is F",
    "the O is C",
    "P has N O and P has N O",
    "P sees a F A",
    "the F A is on the O",
    "i like the C O",
    "P and P have N A",
]
_FACT_TEMPLATES_ALL = [
    "the opposite of X is Y",
    "X is the opposite of Y",
    "the colour of the X is Y",
    "the X is Y",
    "a X has Y legs",
    "a X says Y",
    "X plus Y is Z",
    "X minus Y is Z",
]


def _make_b_lexicon(english: list[str]) -> dict[str, str]:
    rng = random.Random(LANG_SEED)
    taken = set(english)
    out: dict[str, str] = {}
    for w in english:
        while True:
            n_syll = 1 if len(w) <= 3 else 2
            cand = "".join(rng.choice(_CONS) + rng.choice(_VOWS) for _ in range(n_syll))
            cand += rng.choice(_CONS)
            if cand not in taken:
                taken.add(cand)
                out[w] = cand
                break
    return out


ENGLISH_WORDS = _english_words()
EN2B = _make_b_lexicon(ENGLISH_WORDS)
B2EN = {v: k for k, v in EN2B.items()}


def to_b(text: str) -> str:
    """Word-by-word translation of an English string into b (markers are kept)."""
    return " ".join(EN2B.get(w, w) for w in text.split())


def code_switch(text: str, rng: random.Random, p: float) -> str:
    return " ".join(EN2B[w] if (w in EN2B and rng.random() < p) else w for w in text.split())


def vocabulary() -> list[str]:
    """All word tokens (English, b, markers), in a fixed order."""
    return list(MARKERS) + ENGLISH_WORDS + [EN2B[w] for w in ENGLISH_WORDS]


# --------------------------------------------------------------------------------------------
# Facts and problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    relation: str  # one of QA_TEMPLATES' keys
    x: str
    y: str | None  # second operand for arithmetic
    answer: str  # English answer word


def lookup_facts() -> list[Fact]:
    facts: list[Fact] = []
    for a, b in OPPOSITES:
        facts.append(Fact("opposite", a, None, b))
        facts.append(Fact("opposite", b, None, a))
    facts += [Fact("colour", n, None, c) for n, c in COLOURS_OF]
    facts += [Fact("legs", n, None, NUMBERS[k]) for n, k in LEGS_OF]
    facts += [Fact("sound", n, None, s) for n, s in SOUNDS_OF]
    return facts


def arithmetic_facts() -> list[Fact]:
    facts = [Fact("plus", NUMBERS[a], NUMBERS[b], NUMBERS[a + b]) for a in range(10) for b in range(10)]
    facts += [
        Fact("minus", NUMBERS[s], NUMBERS[b], NUMBERS[s - b])
        for s in range(19)
        for b in range(10)
        if 0 <= s - b <= 9
    ]
    return facts


def answer_space(relation: str) -> list[str]:
    """English answer words for a relation (the MC choices before translation)."""
    if relation in ("plus", "minus", "legs"):
        return list(NUMBERS)
    if relation == "opposite":
        return sorted({w for p in OPPOSITES for w in p})
    if relation == "colour":
        return list(COLOURS)
    if relation == "sound":
        return sorted({s for _, s in SOUNDS_OF})
    raise KeyError(relation)


def question(f: Fact, template: int) -> str:
    t = QA_TEMPLATES[f.relation][template]
    return t.replace("X", f.x).replace("Y", f.y) if f.y is not None else t.replace("X", f.x)


def statement(f: Fact, rng: random.Random) -> str:
    if f.relation == "opposite":
        t = rng.choice(["the opposite of X is Y", "Y is the opposite of X"])
        return t.replace("X", f.x).replace("Y", f.answer)
    if f.relation == "colour":
        t = rng.choice(["the colour of the X is Y", "the X is Y"])
        return t.replace("X", f.x).replace("Y", f.answer)
    if f.relation == "legs":
        return f"a {f.x} has {f.answer} legs"
    if f.relation == "sound":
        return f"a {f.x} says {f.answer}"
    if f.relation in ("plus", "minus"):
        return f"{f.x} {f.relation} {f.y} is {f.answer}"
    raise KeyError(f.relation)


def random_sentence(rng: random.Random) -> str:
    t = rng.choice(_SENTENCE_TEMPLATES)
    out = []
    for w in t.split():
        if w == "N":
            out.append(rng.choice(NUMBERS[2:13]))
        elif w == "C":
            out.append(rng.choice(COLOURS))
        elif w == "A":
            out.append(rng.choice(ANIMALS))
        elif w == "O":
            out.append(rng.choice(OBJECTS))
        elif w == "F":
            out.append(rng.choice(rng.choice(OPPOSITES)))
        elif w == "P":
            out.append(rng.choice(NAMES))
        else:
            out.append(w)
    return " ".join(out)


# --------------------------------------------------------------------------------------------
# Item splits: which (fact, template) pairs train the specialists and which are evaluated
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    fact: Fact
    template: int


def split_items(seed: int = 0, dev_share: float = 1 / 3) -> dict[str, list[Item]]:
    """Deterministic split of question items.

    Every fact has 4 phrasings; per fact two random phrasings go to specialist training, the other
    two are held out for evaluation. Held-out items go to "dev" or "test" by fact (``dev_share`` of
    the facts, rounded down, to dev; the rest to test), so dev and test never share a fact. The
    training items do not depend on ``dev_share``.
    Keys: lookup_train, lookup_dev, lookup_test, arith_train, arith_dev, arith_test.
    """
    rng = random.Random(f"demo-split-{seed}")
    out: dict[str, list[Item]] = {}
    for name, facts in (("lookup", lookup_facts()), ("arith", arithmetic_facts())):
        train, dev, test = [], [], []
        order = list(range(len(facts)))
        rng.shuffle(order)
        n_dev = math.floor(len(facts) * dev_share + 1e-9)  # 1e-9: 1/3 of 3k facts is k, not k - 1
        dev_ids = set(order[:n_dev])
        for i, f in enumerate(facts):
            ts = [0, 1, 2, 3]
            rng.shuffle(ts)
            train += [Item(f, t) for t in sorted(ts[:2])]
            held = [Item(f, t) for t in sorted(ts[2:])]
            (dev if i in dev_ids else test).extend(held)
        out[f"{name}_train"] = train
        out[f"{name}_dev"] = dev
        out[f"{name}_test"] = test
    return out


def qa_text(item: Item, lang: str) -> tuple[str, str]:
    """(question, answer) strings of an item in language "en" or "b"."""
    q = question(item.fact, item.template)
    a = item.fact.answer
    if lang == "b":
        return to_b(q), EN2B[a]
    return q, a


def mc_doc(item: Item, lang: str, bilingual_choices: bool = True) -> dict:
    """A multiple-choice document: the question in `lang`; the right answer is the answer *in
    `lang`*. With bilingual_choices the choices hold every candidate answer in both languages (a
    right answer in the wrong language is wrong); otherwise only those in `lang`."""
    q, a = qa_text(item, lang)
    space = answer_space(item.fact.relation)
    same = [EN2B[w] for w in space] if lang == "b" else list(space)
    other = list(space) if lang == "b" else [EN2B[w] for w in space]
    choices = same + other if bilingual_choices else same
    return {
        "question": q,
        "choices": choices,
        "gold": choices.index(a),
        "relation": item.fact.relation,
        "lang": lang,
    }


# --------------------------------------------------------------------------------------------
# Training corpora
# --------------------------------------------------------------------------------------------


def base_stream(rng: random.Random, cfg: dict) -> Iterator[str]:
    """Endless stream of base pre-training texts (see world.DEFAULT_CONFIG for the knobs)."""
    lookups = lookup_facts()
    ariths = arithmetic_facts()
    en_qa = [Item(f, t) for f in lookups for t in range(4)]  # English Q/A about facts, all phrasings
    mix = cfg["base_mix"]
    kinds = list(mix)
    weights = [mix[k] for k in kinds]
    arith_mode = cfg.get("base_arith", "none")
    while True:
        kind = rng.choices(kinds, weights)[0]
        if kind == "sentence":
            s = random_sentence(rng) if rng.random() < 0.5 else statement(rng.choice(lookups), rng)
            if arith_mode != "none" and rng.random() < cfg.get("arith_frac", 0.3):
                s = statement(rng.choice(ariths), rng)
                if arith_mode == "en":
                    yield s
                    continue
            r = rng.random()
            if r < 0.35:
                yield s
            elif r < 0.7:
                yield to_b(s)
            else:
                yield code_switch(s, rng, rng.choice([0.3, 0.5, 0.7]))
        elif kind == "parallel":
            s = random_sentence(rng) if rng.random() < 0.5 else statement(rng.choice(lookups), rng)
            if rng.random() < 0.5:
                yield f"{s} | {to_b(s)}"
            else:
                yield f"{to_b(s)} | {s}"
        elif kind == "en_qa":
            q, a = qa_text(rng.choice(en_qa), "en")
            qa_cs = cfg.get("qa_cs", 0.0)
            if qa_cs and rng.random() < qa_cs:
                q = code_switch(q, rng, rng.choice([0.3, 0.5, 0.7]))
            yield f"{q} {a}"
        else:
            raise KeyError(kind)


def qa_stream(rng: random.Random, items: list[Item], lang: str, answer: str | None = None) -> Iterator[str]:
    """Questions asked in ``lang``, answered in ``answer`` (default: ``lang``)."""
    answer = answer or lang
    while True:
        item = rng.choice(items)
        q, _ = qa_text(item, lang)
        a = item.fact.answer if answer == "en" else EN2B[item.fact.answer]
        yield f"{q} {a}"


def qa_mix_stream(rng: random.Random, parts: list[tuple[list[Item], str, str]]) -> Iterator[str]:
    """Each text drawn from one of ``parts`` (items, question language, answer language), chosen
    uniformly; a single part is exactly :func:`qa_stream`."""
    streams = [qa_stream(rng, items, ask, answer) for items, ask, answer in parts]
    if len(streams) == 1:
        yield from streams[0]
    while True:
        yield next(rng.choice(streams))

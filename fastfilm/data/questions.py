"""CLEVR-style question families: programs built from a scene, answered by the executor.

Each family has a stable name and `question_family_index` (its position in FAMILIES:
append new families at the end, never reorder), one of the five question types, and a
number of relation hops. A family's sampler describes objects of the scene the way
CLEVR's templates do (size, color, material, shape; CLEVR's Z C M S), with synonyms, and
returns a program plus its words. The answer is always `program.execute(program, scene,
strict=True)`: questions whose `unique` does not pick one object, or with a filter,
union or intersection that changes nothing, are rejected there.

Answer balance (CLEVR's rejection of over-represented answers) is done in two steps so
that the output does not depend on how images are spread over worker processes:
`question_pools` (per image, in a worker) collects for each question slot a few candidate
questions, then `Balancer` (in image order, in the main process) picks for each slot the
candidate whose answer is rarest so far among questions of the same family and signature.
The signature is the program's sequence of functions ('filter_color', 'count', ...): what
the wording reveals without looking at the image. Balancing per family alone leaves answers
that the wording predicts ("Are there any large red metal cubes?" is mostly "no" in a
4-object scene), which a question-only model learns; balancing per signature removes most of
that, so the blind baselines stay near chance and what FiLM gains over them is vision.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Callable

from fastfilm.data.program import ATTRIBUTES, IllPosedError, execute
from fastfilm.data.scene import COLORS, MATERIALS, SHAPES, SIZES
from fastfilm.data.types import QUESTION_TYPES

VALUES = {"size": tuple(SIZES), "color": tuple(COLORS), "material": MATERIALS, "shape": SHAPES}
YES_NO = ("yes", "no")
COUNTS = tuple(str(i) for i in range(11))
RELATION_WORDS = {"left": ("left of", "to the left of", "on the left side of"),
                  "right": ("right of", "to the right of", "on the right side of"),
                  "behind": ("behind",), "front": ("in front of",)}
_NOUNS = {"cube": ("cube", "block"), "sphere": ("sphere", "ball"), "cylinder": ("cylinder",), None: ("thing", "object")}
_ADJECTIVES = {"large": ("large", "big"), "small": ("small", "tiny"),
               "rubber": ("rubber", "matte"), "metal": ("metal", "metallic", "shiny")}
MAX_TRIES = 8  # samples per question slot: the candidates the balancer chooses from


@dataclass(frozen=True)
class Family:
    index: int            # question_family_index
    name: str
    type: str             # one of fastfilm.data.types.QUESTION_TYPES
    hops: int             # relation hops (relate or same_*) on the longest chain
    answers: tuple        # every answer the family can give
    sample: Callable      # (View, random.Random) -> (program, question) or None


class View:
    """What the samplers read of a scene: attribute tuples in Z C M S order, relationships."""

    def __init__(self, scene: dict):
        self.scene = scene
        self.attrs = [tuple(o[a] for a in ATTRIBUTES) for o in scene["objects"]]
        self.all = list(range(len(self.attrs)))
        self.rel = scene["relationships"]


class _Program:
    def __init__(self):
        self.steps: list[dict] = []

    def add(self, fn: str, inputs: tuple = (), values: tuple = ()) -> int:
        self.steps.append({"function": fn, "inputs": list(inputs), "value_inputs": list(values)})
        return len(self.steps) - 1

    def filters(self, inp: int, desc: tuple) -> int:
        for attr, value in zip(ATTRIBUTES, desc):
            if value is not None:
                inp = self.add("filter_" + attr, (inp,), (value,))
        return inp


# ---------------------------------------------------------------- describing objects

def _prune(v: View, pool: list[int], desc) -> tuple:
    """desc without the filters that, applied in program order, do not narrow the set."""
    out = [None] * 4
    for k, value in enumerate(desc):
        if value is not None:
            nxt = [i for i in pool if v.attrs[i][k] == value]
            if len(nxt) < len(pool):
                out[k], pool = value, nxt
    return tuple(out)


def _unique_desc(v: View, rng: random.Random, pool: list[int], target: int, exclude: str = "") -> tuple | None:
    """A shortest-ish description that picks `target` alone out of `pool`, or None."""
    order = [k for k in range(4) if ATTRIBUTES[k] != exclude]
    rng.shuffle(order)
    desc, cur = [None] * 4, pool
    for k in order:
        if len(cur) == 1:
            break
        nxt = [i for i in cur if v.attrs[i][k] == v.attrs[target][k]]
        if len(nxt) < len(cur):
            desc[k], cur = v.attrs[target][k], nxt
    return _prune(v, pool, desc) if len(cur) == 1 else None


def _set_desc(v: View, rng: random.Random, pool: list[int], exclude: str = "", min_filters: int = 0) -> tuple | None:
    """A description of a subset of `pool` (possibly empty), or None if too short."""
    if pool and rng.random() < 0.65:
        ref = v.attrs[rng.choice(pool)]  # mostly describe objects that are there
    else:
        ref = tuple(rng.choice(VALUES[a]) for a in ATTRIBUTES)
    desc = [ref[k] if ATTRIBUTES[k] != exclude and rng.random() < 0.45 else None for k in range(4)]
    desc = _prune(v, pool, desc)
    return desc if sum(d is not None for d in desc) >= min_filters else None


def _implies(a: tuple, b: tuple) -> bool:
    """Whether description a carries every filter of description b."""
    return all(y is None or x == y for x, y in zip(a, b))


def noun_phrase(desc: tuple, rng: random.Random, plural: bool = False) -> str:
    """'big red shiny block', 'matte things', 'object' for a (size, color, material, shape) tuple."""
    size, color, material, shape = desc
    words = [rng.choice(_ADJECTIVES[size]) if size else "", color or "",
             rng.choice(_ADJECTIVES[material]) if material else ""]
    noun = rng.choice(_NOUNS[shape])
    return " ".join(w for w in words + [noun + "s" if plural else noun] if w)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _sentence(text: str) -> str:
    text = " ".join(text.split())
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------- samplers

def _chain(v: View, rng: random.Random, hops: int):
    """A chain of `hops` relate steps from a uniquely described object.

    Returns (program, step of the last set, that set, phrase(article) of the last object,
    relation words of the last hop, description of the first object) or None.
    """
    p = _Program()
    cur, pool = p.add("scene"), v.all
    phrase: Callable[[str], str] | None = None
    last_rel, anchor = "", None
    for _ in range(hops):
        target = rng.choice(pool)
        desc = _unique_desc(v, rng, pool, target)
        rels = [r for r in RELATION_WORDS if v.rel[r][target]]
        if desc is None or not rels:
            return None
        rel = rng.choice(rels)
        anchor = anchor or desc
        u = p.add("unique", (p.filters(cur, desc),))
        cur, pool = p.add("relate", (u,), (rel,)), v.rel[rel][target]
        phrase = partial(_object_phrase, noun_phrase(desc, rng), rng.choice(("that is ", "")), last_rel, phrase)
        last_rel = rng.choice(RELATION_WORDS[rel])
    return p, cur, list(pool), phrase, last_rel, anchor


def _object_phrase(np_: str, that: str, rel: str, inner: Callable | None, article: str = "the") -> str:
    head = _a(np_) if article == "a" else f"the {np_}"
    return head if inner is None else f"{head} {that}{rel} {inner()}"


_EXIST = ("Are there any {P}?", "Is there {A}?", "Are any {P} visible?")
_COUNT = ("How many {P} are there?", "What number of {P} are there?", "How many {P} are visible?")
_EXIST_REL = ("Are there any {P} {rel} {obj}?", "Is there {A} {rel} {obj}?",
              "There is {obj_a}; are there any {P} {rel} it?")
_COUNT_REL = ("How many {P} are {rel} {obj}?", "What number of {P} are {rel} {obj}?",
              "There is {obj_a}; how many {P} are {rel} it?")
_QUERY = {
    "color": ("What color is {S}?", "What is the color of {S}?", "{S} is what color?",
              "There is {SA}; what color is it?"),
    "shape": ("What shape is {S}?", "What is the shape of {S}?", "{S} has what shape?",
              "There is {SA}; what shape is it?"),
    "material": ("What material is {S}?", "What is {S} made of?", "What is the material of {S}?",
                 "There is {SA}; what is it made of?"),
    "size": ("What size is {S}?", "How big is {S}?", "What is the size of {S}?", "There is {SA}; how big is it?"),
}


def _sample_chain(v: View, rng: random.Random, hops: int, final: str):
    """zero/one/two/three-hop families: final is 'exist', 'count' or an attribute to query."""
    chain = _chain(v, rng, hops)
    if chain is None:
        return None
    p, cur, pool, obj, rel, anchor = chain
    if final in ("exist", "count"):
        desc = _set_desc(v, rng, pool, min_filters=1 if hops == 0 and final == "exist" else 0)
        if desc is None or (hops == 1 and _implies(desc, anchor)):
            return None  # "cubes left of the cube": only the cube itself fits, so the text says 0
        p.add(final, (p.filters(cur, desc),))
        words = dict(P=noun_phrase(desc, rng, plural=True), A=_a(noun_phrase(desc, rng)), rel=rel)
        if hops == 0:
            template = rng.choice(_EXIST if final == "exist" else _COUNT)
        else:
            template = rng.choice(_EXIST_REL if final == "exist" else _COUNT_REL)
            words.update(obj=obj(), obj_a=obj("a"))
        return p.steps, _sentence(template.format(**words))
    if not pool:
        return None
    desc = _unique_desc(v, rng, pool, rng.choice(pool), exclude=final)
    if desc is None:
        return None
    p.add("query_" + final, (p.add("unique", (p.filters(cur, desc),)),))
    np_ = noun_phrase(desc, rng)
    tail = "" if hops == 0 else f" {rng.choice(('that is ', ''))}{rel} {obj()}"
    text = rng.choice(_QUERY[final]).format(S=f"the {np_}{tail}", SA=f"{_a(np_)}{tail}")
    return p.steps, _sentence(text)


def _sample_and(v: View, rng: random.Random, final: str):
    """Objects related to two anchors at once (intersect), counted or tested."""
    p = _Program()
    sets, phrases, anchors = [], [], []
    for _ in range(2):
        chain = _chain(v, rng, 1)
        if chain is None:
            return None
        q, cur, pool, obj, rel, anchor = chain
        anchors.append(anchor)
        offset = len(p.steps)
        for step in q.steps:  # append the branch, shifting its input indices
            p.add(step["function"], tuple(j + offset for j in step["inputs"]), tuple(step["value_inputs"]))
        sets.append((cur + offset, pool))
        phrases.append(f"{rel} {obj()}")
    both = [i for i in sets[0][1] if i in sets[1][1]]
    desc = _set_desc(v, rng, both)
    if any(_implies(desc, a) for a in anchors):
        return None
    p.add(final, (p.filters(p.add("intersect", (sets[0][0], sets[1][0])), desc),))
    P, S = noun_phrase(desc, rng, plural=True), noun_phrase(desc, rng)
    a, b = phrases
    if final == "count":
        template = rng.choice(("How many {P} are both {a} and {b}?", "What number of {P} are {a} and {b}?"))
    else:
        template = rng.choice(("Are there any {P} that are both {a} and {b}?", "Is there {A} that is {a} and {b}?"))
    return p.steps, _sentence(template.format(P=P, A=_a(S), a=a, b=b))


def _sample_or(v: View, rng: random.Random):
    """Objects matching either of two descriptions (union), counted."""
    da, db = _set_desc(v, rng, v.all, min_filters=1), _set_desc(v, rng, v.all, min_filters=1)
    if da is None or db is None or da == db:
        return None
    p = _Program()
    fa = p.filters(p.add("scene"), da)
    fb = p.filters(p.add("scene"), db)
    p.add("count", (p.add("union", (fa, fb)),))
    template = rng.choice(("How many things are {a} or {b}?", "How many things are either {a} or {b}?",
                           "What number of things are {a} or {b}?", "How many {a} or {b} are there?"))
    return p.steps, _sentence(template.format(a=noun_phrase(da, rng, True), b=noun_phrase(db, rng, True)))


_SAME = {  # attribute -> (singular verb phrase, plural verb phrase) choices
    "color": (("has the same color as", "is the same color as"), ("have the same color as", "are the same color as")),
    "shape": (("has the same shape as", "is the same shape as"), ("have the same shape as", "are the same shape as")),
    "material": (("is made of the same material as", "has the same material as"),
                 ("are made of the same material as", "have the same material as")),
    "size": (("has the same size as", "is the same size as"), ("have the same size as", "are the same size as")),
}


def _sample_same(v: View, rng: random.Random, attr: str, final: str):
    """Other objects sharing an attribute with a described object (same_<attr>)."""
    target = rng.choice(v.all)
    desc = _unique_desc(v, rng, v.all, target, exclude=attr)
    if desc is None:
        return None
    k = ATTRIBUTES.index(attr)
    others = [i for i in v.all if i != target and v.attrs[i][k] == v.attrs[target][k]]
    fdesc = _set_desc(v, rng, others, exclude=attr)
    if _implies(fdesc, desc):
        return None  # "another red cube ... as the red cube": the text alone says "no"/"0"
    p = _Program()
    same = p.add("same_" + attr, (p.add("unique", (p.filters(p.add("scene"), desc),)),))
    p.add(final, (p.filters(same, fdesc),))
    obj, singular, plural = f"the {noun_phrase(desc, rng)}", *_SAME[attr]
    if final == "count":
        how_many = rng.choice(("How many", "What number of"))
        text = f"{how_many} other {noun_phrase(fdesc, rng, True)} {rng.choice(plural)} {obj}?"
    elif rng.random() < 0.5:
        text = f"Is there another {noun_phrase(fdesc, rng)} that {rng.choice(singular)} {obj}?"
    else:
        text = f"Are there any other {noun_phrase(fdesc, rng, True)} that {rng.choice(plural)} {obj}?"
    return p.steps, _sentence(text)


_COMPARE_INTEGER = {
    "equal_integer": ("Are there the same number of {a} and {b}?", "Is the number of {a} the same as the number of {b}?",
                      "Are there an equal number of {a} and {b}?"),
    "less_than": ("Are there fewer {a} than {b}?", "Is the number of {a} less than the number of {b}?"),
    "greater_than": ("Are there more {a} than {b}?", "Is the number of {a} greater than the number of {b}?"),
}


def _sample_compare_integer(v: View, rng: random.Random, fn: str):
    da, db = _set_desc(v, rng, v.all, min_filters=1), _set_desc(v, rng, v.all, min_filters=1)
    if da is None or db is None or da == db:
        return None
    p = _Program()
    ca = p.add("count", (p.filters(p.add("scene"), da),))
    cb = p.add("count", (p.filters(p.add("scene"), db),))
    p.add(fn, (ca, cb))
    text = rng.choice(_COMPARE_INTEGER[fn]).format(a=noun_phrase(da, rng, True), b=noun_phrase(db, rng, True))
    return p.steps, _sentence(text)


_COMPARE_ATTRIBUTE = {
    "color": ("Is {a} the same color as {b}?", "Does {a} have the same color as {b}?",
              "Do {a} and {b} have the same color?"),
    "shape": ("Does {a} have the same shape as {b}?", "Is {a} the same shape as {b}?",
              "Do {a} and {b} have the same shape?"),
    "material": ("Is {a} made of the same material as {b}?", "Does {a} have the same material as {b}?",
                 "Are {a} and {b} made of the same material?"),
    "size": ("Is {a} the same size as {b}?", "Does {a} have the same size as {b}?", "Are {a} and {b} the same size?"),
}


def _sample_compare_attribute(v: View, rng: random.Random, attr: str):
    k = ATTRIBUTES.index(attr)
    a = rng.choice(v.all)
    if rng.random() < 0.5:  # half the time aim for a matching pair, which is rarer
        pool = [i for i in v.all if i != a and v.attrs[i][k] == v.attrs[a][k]] or v.all
    else:
        pool = v.all
    b = rng.choice(pool)
    da, db = _unique_desc(v, rng, v.all, a, exclude=attr), _unique_desc(v, rng, v.all, b, exclude=attr)
    if a == b or da is None or db is None:
        return None
    p = _Program()
    qa = p.add("query_" + attr, (p.add("unique", (p.filters(p.add("scene"), da),)),))
    qb = p.add("query_" + attr, (p.add("unique", (p.filters(p.add("scene"), db),)),))
    p.add("equal_" + attr, (qa, qb))
    text = rng.choice(_COMPARE_ATTRIBUTE[attr]).format(a=f"the {noun_phrase(da, rng)}", b=f"the {noun_phrase(db, rng)}")
    return p.steps, _sentence(text)


def _build_families() -> tuple[Family, ...]:
    out: list[Family] = []

    def add(name: str, type_: str, hops: int, answers: tuple, sample: Callable) -> None:
        if type_ not in QUESTION_TYPES:
            raise ValueError(f"family {name}: unknown question type {type_!r}")
        out.append(Family(len(out), name, type_, hops, answers, sample))

    for hops, prefix in enumerate(("zero_hop", "one_hop", "two_hop", "three_hop")):
        add(f"{prefix}_exist", "exist", hops, YES_NO, partial(_sample_chain, hops=hops, final="exist"))
        add(f"{prefix}_count", "count", hops, COUNTS, partial(_sample_chain, hops=hops, final="count"))
        for attr in ("color", "shape", "material", "size"):
            add(f"{prefix}_query_{attr}", "query_attribute", hops, VALUES[attr],
                partial(_sample_chain, hops=hops, final=attr))
    add("and_exist", "exist", 1, YES_NO, partial(_sample_and, final="exist"))
    add("and_count", "count", 1, COUNTS, partial(_sample_and, final="count"))
    add("or_count", "count", 0, COUNTS, _sample_or)
    for attr in ("color", "shape", "material", "size"):
        add(f"same_{attr}_exist", "exist", 1, YES_NO, partial(_sample_same, attr=attr, final="exist"))
        add(f"same_{attr}_count", "count", 1, COUNTS, partial(_sample_same, attr=attr, final="count"))
    for fn, name in (("equal_integer", "equal"), ("less_than", "less"), ("greater_than", "greater")):
        add(f"compare_integer_{name}", "compare_integer", 0, YES_NO, partial(_sample_compare_integer, fn=fn))
    for attr in ("color", "shape", "material", "size"):
        add(f"compare_{attr}", "compare_attribute", 0, YES_NO, partial(_sample_compare_attribute, attr=attr))
    return tuple(out)


FAMILIES: tuple[Family, ...] = _build_families()
FAMILY_BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}


def family_table() -> list[dict]:
    """[{index, name, type, hops}] of every family (written into the questions file's info)."""
    return [{"index": f.index, "name": f.name, "type": f.type, "hops": f.hops} for f in FAMILIES]


# ---------------------------------------------------------------- pools and balance

Candidate = tuple  # (answer, question, program)


def signature(program: list[dict]) -> tuple[str, ...]:
    """The program's functions in order, without their values: which attributes a question
    filters on and how it combines them, i.e. what its wording gives away."""
    return tuple(step["function"] for step in program)


def family_pool(family: Family, scene: dict, rng: random.Random, view: View | None = None) -> list[Candidate]:
    """Up to MAX_TRIES samples of `family` on `scene`: one candidate per (answer, signature)."""
    view = view or View(scene)
    pool: dict[tuple, Candidate] = {}
    texts: set[str] = set()
    for _attempt in range(MAX_TRIES):
        got = family.sample(view, rng)
        if got is None:
            continue
        program, text = got
        try:
            answer = execute(program, scene, strict=True)
        except IllPosedError:
            continue
        key = (answer, signature(program))
        if key not in pool and text not in texts:
            pool[key] = (answer, text, program)
            texts.add(text)
    return list(pool.values())


def question_pools(scene: dict, families: list[Family], rng: random.Random,
                   slots: int) -> list[tuple[int, list[Candidate]]]:
    """For each of `slots` questions about `scene`: (family index, pool). Families are taken
    in a per-image random order (so each is used evenly); one that yields nothing on this
    scene (say three hops among three objects) gives its turn to the next."""
    view = View(scene)
    order = list(families)
    rng.shuffle(order)
    out, pos = [], 0
    for _slot in range(slots):
        for _turn in range(len(order)):
            family = order[pos % len(order)]
            pos += 1
            pool = family_pool(family, scene, rng, view)
            if pool:
                out.append((family.index, pool))
                break
    return out


class Balancer:
    """Greedy answer balancing within each (family, signature), in a fixed order of images."""

    def __init__(self):
        self.by_signature: dict[tuple, Counter] = defaultdict(Counter)
        self.by_family: dict[int, Counter] = defaultdict(Counter)

    def _share(self, family_index: int, candidate: Candidate) -> float:
        """How common the candidate's answer is so far within its signature, plus within its
        family (which keeps families balanced where one answer is rarely available, such as
        "yes" to compare_color)."""
        answer, _text, program = candidate
        share = 0.0
        for counts in (self.by_signature[(family_index, signature(program))], self.by_family[family_index]):
            total = sum(counts.values())
            share += counts[answer] / total if total else 0.0
        return share

    def choose(self, family_index: int, pool: list[Candidate], rng: random.Random,
               taken: set[str]) -> Candidate | None:
        """(answer, question, program): the candidate whose answer is rarest so far among
        questions of its family and signature, skipping questions already asked about the
        image (`taken`); None if none is left."""
        options = [c for c in pool if c[1] not in taken]
        if not options:
            return None
        scores = [self._share(family_index, c) for c in options]
        least = min(scores)
        best = [c for c, sc in zip(options, scores) if sc == least]
        answer, text, program = best[rng.randrange(len(best))]
        self.by_signature[(family_index, signature(program))][answer] += 1
        self.by_family[family_index][answer] += 1
        return answer, text, program

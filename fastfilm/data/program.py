"""The CLEVR functional program executor, written once for the whole project.

A program is CLEVR v1.0's list of steps `{"function", "inputs", "value_inputs"}`; step i
may only read the outputs of earlier steps. Older CLEVR tools spell the keys `"type"` and
`"side_inputs"`, and the FiLM code writes values inline (`"filter_color[red]"`); all three
spellings are accepted. Answers are written as CLEVR writes them: "yes"/"no", "0".."10",
attribute words.

Step outputs: a set of objects is a frozenset of object indices, one object an int, a
count a `Count`, a yes/no a bool, an attribute value a str.
"""
from __future__ import annotations

from fastfilm.errors import UserError

ATTRIBUTES = ("size", "color", "material", "shape")  # CLEVR's filter order: Z C M S


class ProgramError(UserError):
    """A malformed program: unknown function, bad input reference, wrong argument kind."""


class IllPosedError(Exception):
    """A well-formed program whose question has no single answer on this scene (`unique`
    of not exactly one object) or, when checked, is degenerate (a filter, union or
    intersection that changes nothing)."""


class Count(int):
    """An integer produced by `count`, kept apart from object indices."""


class _Kind(Exception):
    """An argument of the wrong kind; turned into a ProgramError naming the step."""


def _kind(x) -> str:
    if isinstance(x, frozenset):
        return "a set of objects"
    if isinstance(x, bool):
        return "yes/no"
    if isinstance(x, Count):
        return "a count"
    if isinstance(x, int):
        return "an object"
    return f"the value {x!r}"


def _set(x) -> frozenset:
    if type(x) is not frozenset:
        raise _Kind(f"expects a set of objects, got {_kind(x)}")
    return x


def _obj(x) -> int:
    if type(x) is not int:
        raise _Kind(f"expects one object (the output of unique), got {_kind(x)}")
    return x


def _num(x) -> int:
    if type(x) is not Count:
        raise _Kind(f"expects a count, got {_kind(x)}")
    return x


def _word(x) -> str:
    if type(x) is not str:
        raise _Kind(f"expects an attribute value (the output of query_*), got {_kind(x)}")
    return x


class _Context:
    def __init__(self, scene: dict, strict: bool):
        self.scene, self.objects, self.strict = scene, scene["objects"], strict
        self._rel = None

    @property
    def relationships(self) -> dict:
        if self._rel is None:
            self._rel = self.scene.get("relationships")
            if self._rel is None:
                # Hand-written scenes may carry coordinates and directions only.
                from fastfilm.data.scene import compute_relationships

                if "directions" not in self.scene:
                    raise _Kind("scene has neither 'relationships' nor 'directions'")
                self._rel = compute_relationships(self.objects, self.scene["directions"])
        return self._rel


def _filter(attr: str):
    def run(c: _Context, args, values):
        s = _set(args[0])
        out = frozenset(i for i in s if c.objects[i][attr] == values[0])
        if c.strict and out == s:
            raise IllPosedError(f"filter_{attr} {values[0]!r} does not narrow the set")
        return out
    return run


def _same(attr: str):
    def run(c: _Context, args, values):
        o = _obj(args[0])
        v = c.objects[o][attr]
        return frozenset(i for i, x in enumerate(c.objects) if i != o and x[attr] == v)
    return run


def _query(attr: str):
    return lambda c, args, values: str(c.objects[_obj(args[0])][attr])


def _equal(attr: str):
    return lambda c, args, values: _word(args[0]) == _word(args[1])


def _unique(c: _Context, args, values):
    s = _set(args[0])
    if len(s) != 1:
        raise IllPosedError(f"unique: {len(s)} objects where exactly one is meant")
    return next(iter(s))


def _relate(c: _Context, args, values):
    rel = c.relationships
    if values[0] not in rel:
        raise _Kind(f"unknown relation {values[0]!r}")
    return frozenset(rel[values[0]][_obj(args[0])])


def _union_or_intersect(union: bool):
    def run(c: _Context, args, values):
        a, b = _set(args[0]), _set(args[1])
        out = a | b if union else a & b
        if c.strict and (out == a or out == b):
            raise IllPosedError(f"{'union' if union else 'intersect'}: one operand is redundant")
        return out
    return run


# function -> (inputs, value_inputs, implementation(context, args, values))
FUNCTIONS: dict[str, tuple[int, int, object]] = {
    "scene": (0, 0, lambda c, args, values: frozenset(range(len(c.objects)))),
    "unique": (1, 0, _unique),
    "relate": (1, 1, _relate),
    "union": (2, 0, _union_or_intersect(True)),
    "intersect": (2, 0, _union_or_intersect(False)),
    "count": (1, 0, lambda c, args, values: Count(len(_set(args[0])))),
    "exist": (1, 0, lambda c, args, values: len(_set(args[0])) > 0),
    "equal_integer": (2, 0, lambda c, args, values: _num(args[0]) == _num(args[1])),
    "less_than": (2, 0, lambda c, args, values: _num(args[0]) < _num(args[1])),
    "greater_than": (2, 0, lambda c, args, values: _num(args[0]) > _num(args[1])),
    **{f"filter_{a}": (1, 1, _filter(a)) for a in ATTRIBUTES},
    **{f"same_{a}": (1, 0, _same(a)) for a in ATTRIBUTES},
    **{f"query_{a}": (1, 0, _query(a)) for a in ATTRIBUTES},
    **{f"equal_{a}": (2, 0, _equal(a)) for a in ATTRIBUTES},
}


def parse_step(step: dict, i: int) -> tuple[str, list[int], list[str]]:
    """(function, inputs, value_inputs) of step i in any accepted spelling.

    The one reading of a step for the whole project (the executor, question types, program
    tokens, the reader): a malformed step raises ProgramError naming step i. Written with
    plain loops rather than any(...) generators: the reader calls it for every step of every
    question of a split.
    """
    if type(step) is not dict:
        raise ProgramError(f"program step {i}: expected an object with 'function', got {type(step).__name__}")
    fn = step.get("function") or step.get("type")
    if type(fn) is not str:
        raise ProgramError(f"program step {i}: missing 'function' (or 'type')")
    values = step.get("value_inputs")
    if values is None:
        values = step.get("side_inputs", [])
    if fn.endswith("]") and "[" in fn:  # FiLM-code style "filter_color[red]"
        fn, inline = fn[:-1].split("[", 1)
        values = [inline]
    inputs = step.get("inputs", [])
    if type(inputs) is not list:
        raise ProgramError(f"program step {i} ({fn}): 'inputs' must be a list of step indices")
    for j in inputs:
        if type(j) is not int:
            raise ProgramError(f"program step {i} ({fn}): 'inputs' must be a list of step indices")
    if type(values) is not list:
        raise ProgramError(f"program step {i} ({fn}): 'value_inputs' must be a list")
    for v in values:
        if type(v) is not str:  # CLEVR values are words; a number written as one is kept as text
            return fn, inputs, [str(v) for v in values]
    return fn, inputs, values


def evaluate(program: list[dict], scene: dict, *, strict: bool = False) -> list:
    """Outputs of every step of `program` on `scene`.

    strict: also reject degenerate questions (IllPosedError): a filter that does not
    shrink its input, a union or intersection equal to one of its inputs. The generator
    uses it to keep every word of a question necessary.
    """
    if not isinstance(program, list) or not program:
        raise ProgramError("program must be a non-empty list of steps")
    context = _Context(scene, strict)
    outs: list = []
    for i, step in enumerate(program):
        fn, inputs, values = parse_step(step, i)
        spec = FUNCTIONS.get(fn)
        if spec is None:
            raise ProgramError(f"program step {i} ({fn}): unknown function")
        n_in, n_val, impl = spec
        if len(inputs) != n_in or len(values) != n_val:
            raise ProgramError(f"program step {i} ({fn}): takes {n_in} input(s) and {n_val} value(s), "
                               f"got {len(inputs)} and {len(values)}")
        for j in inputs:
            if not 0 <= j < i:
                raise ProgramError(f"program step {i} ({fn}): input {j} is not an earlier step")
        try:
            outs.append(impl(context, [outs[j] for j in inputs], values))
        except _Kind as e:
            raise ProgramError(f"program step {i} ({fn}): {e}") from None
        except IllPosedError as e:
            raise IllPosedError(f"program step {i}: {e}") from None
        except (KeyError, IndexError, TypeError) as e:
            raise ProgramError(f"program step {i} ({fn}): scene lacks what it reads ({type(e).__name__}: {e})") from None
    return outs


def answer_text(value) -> str:
    """CLEVR's written form of a final output: yes/no, a number, an attribute word."""
    if type(value) is bool:
        return "yes" if value else "no"
    if type(value) is Count:
        return str(int(value))
    if type(value) is str:
        return value
    raise ProgramError(f"program ends in {_kind(value)}, not an answer")


def execute(program: list[dict], scene: dict, *, strict: bool = False) -> str:
    """The answer of `program` on `scene`, as CLEVR writes it.

    Raises IllPosedError when the question has no single answer on this scene (and, with
    strict=True, when it is degenerate), ProgramError when the program is malformed.
    """
    return answer_text(evaluate(program, scene, strict=strict)[-1])

"""The CLEVR program executor on a hand-made scene: every function, every spelling, every error;
and the one reading of a step (program.parse_step) as each of its users sees it."""
import json

import pytest

from fastfilm.data import reader
from fastfilm.data.program import FUNCTIONS, IllPosedError, ProgramError, evaluate, execute
from fastfilm.data.scene import compute_relationships
from fastfilm.data.types import QUESTION_TYPES, type_of_program
from fastfilm.data.vocab import program_tokens
from fastfilm.errors import UserError

#  y (behind)
#  2 |  C
#  1 |        B
#  0 |     A
# -1 |           D
#    +-------------- x (right)
#      -1  0  1  2
OBJECTS = [
    {"shape": "cube", "color": "red", "material": "metal", "size": "large", "3d_coords": [0.0, 0.0, 0.49]},      # A
    {"shape": "sphere", "color": "red", "material": "rubber", "size": "small", "3d_coords": [1.0, 1.0, 0.35]},   # B
    {"shape": "cylinder", "color": "blue", "material": "rubber", "size": "large", "3d_coords": [-1.0, 2.0, 0.7]},  # C
    {"shape": "sphere", "color": "green", "material": "metal", "size": "small", "3d_coords": [2.0, -1.0, 0.35]},  # D
]
DIRECTIONS = {"left": [-1.0, 0.0, 0.0], "right": [1.0, 0.0, 0.0], "behind": [0.0, 1.0, 0.0], "front": [0.0, -1.0, 0.0]}
# Worked out by hand from the picture: RELATIONSHIPS[rel][i] = objects that are rel of object i.
RELATIONSHIPS = {
    "left": [[2], [0, 2], [], [0, 1, 2]],
    "right": [[1, 3], [3], [0, 1, 3], []],
    "behind": [[1, 2], [2], [], [0, 1, 2]],
    "front": [[3], [0, 3], [0, 1, 3], []],
}
SCENE = {"objects": OBJECTS, "relationships": RELATIONSHIPS, "directions": DIRECTIONS}
A, B, C, D = range(4)


def prog(*steps):
    """prog(("scene",), ("filter_color", [0], ["red"]), ...) -> CLEVR v1.0 program."""
    out = []
    for s in steps:
        fn, inputs, values = (list(s) + [[], []])[:3]
        out.append({"function": fn, "inputs": inputs, "value_inputs": values})
    return out


def run(*steps, strict=False):
    return execute(prog(*steps), SCENE, strict=strict)


def the(attr, value):
    """Steps 0-2: the unique object with attr == value."""
    return [("scene",), (f"filter_{attr}", [0], [value]), ("unique", [1])]


def test_hand_relationships_match_compute_relationships():
    assert compute_relationships(OBJECTS, DIRECTIONS) == RELATIONSHIPS


def test_scene_and_filters():
    outs = evaluate(prog(("scene",), ("filter_color", [0], ["red"]), ("filter_size", [1], ["small"]),
                         ("filter_material", [0], ["metal"]), ("filter_shape", [0], ["sphere"])), SCENE)
    assert outs == [frozenset({A, B, C, D}), frozenset({A, B}), frozenset({B}), frozenset({A, D}), frozenset({B, D})]
    assert run(("scene",), ("filter_color", [0], ["purple"]), ("count", [1])) == "0"


def test_unique_and_ill_posed_unique():
    assert evaluate(prog(*the("color", "blue")), SCENE)[-1] == C
    with pytest.raises(IllPosedError):  # two red objects
        run(*the("color", "red")[:2], ("unique", [1]), ("query_shape", [2]))
    with pytest.raises(IllPosedError):  # no purple object
        run(*the("color", "purple")[:2], ("unique", [1]), ("query_shape", [2]))


@pytest.mark.parametrize("rel", ["left", "right", "behind", "front"])
@pytest.mark.parametrize("color,obj", [("blue", C), ("green", D)])
def test_relate(rel, color, obj):
    outs = evaluate(prog(*the("color", color), ("relate", [2], [rel])), SCENE)
    assert outs[-1] == frozenset(RELATIONSHIPS[rel][obj])


def test_relate_chain_count():
    # How many things are behind the thing that is right of the blue cylinder... right of C = {A, B, D};
    # unique needs one: the green thing right of the blue thing is D; behind D = {A, B, C}.
    steps = the("color", "blue") + [("relate", [2], ["right"]), ("filter_color", [3], ["green"]), ("unique", [4]),
                                    ("relate", [5], ["behind"]), ("count", [6])]
    assert run(*steps) == "3"


@pytest.mark.parametrize("attr,select,anchor,expected", [
    ("color", ("shape", "cube"), A, {B}), ("size", ("shape", "cube"), A, {C}),
    ("material", ("shape", "cube"), A, {D}), ("shape", ("color", "green"), D, {B}),
    ("shape", ("color", "blue"), C, set()),
])
def test_same(attr, select, anchor, expected):
    outs = evaluate(prog(*the(*select), (f"same_{attr}", [2])), SCENE)
    assert outs[2] == anchor and outs[-1] == frozenset(expected)


def test_union_intersect_count_exist():
    red, metal = ("filter_color", [0], ["red"]), ("filter_material", [0], ["metal"])
    assert run(("scene",), red, metal, ("union", [1, 2]), ("count", [3])) == "3"
    assert run(("scene",), red, metal, ("intersect", [1, 2]), ("count", [3])) == "1"
    assert run(("scene",), red, metal, ("intersect", [1, 2]), ("exist", [3])) == "yes"
    assert run(("scene",), ("filter_color", [0], ["blue"]), metal, ("intersect", [1, 2]), ("exist", [3])) == "no"


@pytest.mark.parametrize("attr,answer", [("color", "blue"), ("shape", "cylinder"), ("material", "rubber"),
                                         ("size", "large")])
def test_query(attr, answer):
    assert run(*the("color", "blue"), (f"query_{attr}", [2])) == answer
    assert type_of_program(prog(*the("color", "blue"), (f"query_{attr}", [2]))) == "query_attribute"


CUBE, CYLINDER, GREEN, RED_SPHERE = [("shape", "cube")], [("shape", "cylinder")], [("color", "green")], \
    [("color", "red"), ("shape", "sphere")]


@pytest.mark.parametrize("attr,first,second,answer", [
    ("color", CUBE, RED_SPHERE, "yes"), ("color", CUBE, CYLINDER, "no"),
    ("size", CUBE, CYLINDER, "yes"), ("size", CUBE, GREEN, "no"),
    ("material", CUBE, GREEN, "yes"), ("material", CUBE, CYLINDER, "no"),
    ("shape", GREEN, RED_SPHERE, "yes"), ("shape", CUBE, GREEN, "no"),
])
def test_equal_attribute(attr, first, second, answer):
    steps, queries = [], []
    for filters in (first, second):
        steps.append(("scene",))
        for key, value in filters:
            steps.append((f"filter_{key}", [len(steps) - 1], [value]))
        steps.append(("unique", [len(steps) - 1]))
        steps.append((f"query_{attr}", [len(steps) - 1]))
        queries.append(len(steps) - 1)
    steps.append((f"equal_{attr}", queries))
    assert run(*steps) == answer
    assert type_of_program(prog(*steps)) == "compare_attribute"


@pytest.mark.parametrize("fn,answer", [("equal_integer", "yes"), ("less_than", "no"), ("greater_than", "no")])
def test_compare_integer_equal_counts(fn, answer):
    steps = [("scene",), ("filter_color", [0], ["red"]), ("count", [1]),
             ("scene",), ("filter_material", [3], ["metal"]), ("count", [4]), (fn, [2, 5])]
    assert run(*steps) == answer  # 2 red things, 2 metal things


@pytest.mark.parametrize("fn,answer", [("equal_integer", "no"), ("less_than", "yes"), ("greater_than", "no")])
def test_compare_integer_different_counts(fn, answer):
    steps = [("scene",), ("filter_color", [0], ["blue"]), ("count", [1]),
             ("scene",), ("filter_size", [3], ["small"]), ("count", [4]), (fn, [2, 5])]
    assert run(*steps) == answer  # 1 blue thing, 2 small things
    assert type_of_program(prog(*steps)) == "compare_integer"


def test_the_executor_knows_exactly_the_functions_tested_here():
    tested = {"scene", "unique", "relate", "union", "intersect", "count", "exist", "equal_integer", "less_than",
              "greater_than"} | {f"{p}_{a}" for p in ("filter", "same", "query", "equal")
                                 for a in ("color", "shape", "material", "size")}
    assert set(FUNCTIONS) == tested


def test_strict_rejects_degenerate_questions():
    no_narrowing = [("scene",), ("filter_color", [0], ["blue"]), ("filter_shape", [1], ["cylinder"]), ("count", [2])]
    assert run(*no_narrowing) == "1"
    with pytest.raises(IllPosedError):
        run(*no_narrowing, strict=True)
    red, small = ("filter_color", [0], ["red"]), ("filter_size", [0], ["small"])
    with pytest.raises(IllPosedError):  # the small red thing is already among the red things
        run(("scene",), red, ("filter_size", [1], ["small"]), ("union", [1, 2]), ("count", [3]), strict=True)
    assert run(("scene",), red, small, ("union", [1, 2]), ("count", [3]), strict=True) == "3"
    with pytest.raises(IllPosedError):  # intersect with a superset changes nothing
        run(("scene",), red, ("intersect", [0, 1]), ("count", [2]), strict=True)


def test_older_spellings():
    old = [{"type": "scene", "inputs": [], "side_inputs": []},
           {"type": "filter_shape", "inputs": [0], "side_inputs": ["cube"]},
           {"type": "unique", "inputs": [1], "side_inputs": []},
           {"type": "query_color", "inputs": [2], "side_inputs": []}]
    assert execute(old, SCENE) == "red"
    film_style = [{"function": "scene", "inputs": []}, {"function": "filter_shape[cube]", "inputs": [0]},
                  {"function": "unique", "inputs": [1]}, {"function": "query_material", "inputs": [2]}]
    assert execute(film_style, SCENE) == "metal"
    assert type_of_program(old) == "query_attribute"


def test_relationships_recomputed_when_absent():
    scene = {"objects": OBJECTS, "directions": DIRECTIONS}
    assert execute(prog(*the("color", "green"), ("relate", [2], ["behind"]), ("count", [3])), scene) == "3"


@pytest.mark.parametrize("steps,match", [
    ([("scene",), ("frobnicate", [0])], "unknown function"),
    ([("scene",), ("count", [1])], "not an earlier step"),
    ([("scene",), ("filter_color", [0])], "1 value"),
    ([("scene",), ("query_color", [0])], "expects one object"),
    ([("scene",), ("count", [0]), ("count", [1])], "expects a set"),
    ([("scene",), ("count", [0]), ("equal_color", [1, 1])], "expects an attribute value"),
    ([("scene",), ("exist", [0]), ("less_than", [1, 1])], "expects a count"),
    ([("scene",), ("filter_color", [0], ["red"])], "not an answer"),
    ([*the("color", "blue"), ("relate", [2], ["above"])], "unknown relation"),
])
def test_malformed_programs(steps, match):
    with pytest.raises(ProgramError, match=match) as err:
        run(*steps)
    assert isinstance(err.value, UserError)  # the CLI prints it without a traceback


def test_malformed_step_shapes():
    with pytest.raises(ProgramError, match="non-empty"):
        execute([], SCENE)
    with pytest.raises(ProgramError, match="step 0"):
        execute(["scene"], SCENE)
    with pytest.raises(ProgramError, match="missing 'function'"):
        execute([{"inputs": []}], SCENE)
    with pytest.raises(ProgramError, match="list of step indices"):
        execute([{"function": "scene", "inputs": "0"}], SCENE)
    with pytest.raises(ProgramError, match="scene lacks"):
        execute(prog(("scene",), ("filter_color", [0], ["red"]), ("count", [1])), {"objects": [{"shape": "cube"}]})


# ------------------------------------------------------------ every user of parse_step

# "How many things are left of the cube?" in each spelling parse_step accepts: CLEVR v1.0's,
# older CLEVR tools' ("type", "side_inputs") and the FiLM code's inline values.
SPELLINGS = {
    "clevr_v1": [{"function": "scene", "inputs": [], "value_inputs": []},
                 {"function": "filter_shape", "inputs": [0], "value_inputs": ["cube"]},
                 {"function": "unique", "inputs": [1], "value_inputs": []},
                 {"function": "relate", "inputs": [2], "value_inputs": ["left"]},
                 {"function": "count", "inputs": [3], "value_inputs": []}],
    "type_side_inputs": [{"type": "scene", "inputs": [], "side_inputs": []},
                         {"type": "filter_shape", "inputs": [0], "side_inputs": ["cube"]},
                         {"type": "unique", "inputs": [1], "side_inputs": []},
                         {"type": "relate", "inputs": [2], "side_inputs": ["left"]},
                         {"type": "count", "inputs": [3], "side_inputs": []}],
    "film_inline": [{"function": "scene", "inputs": []}, {"function": "filter_shape[cube]", "inputs": [0]},
                    {"function": "unique", "inputs": [1]}, {"function": "relate[left]", "inputs": [2]},
                    {"function": "count", "inputs": [3]}],
}
TOKENS = ["scene", "filter_shape[cube]", "unique", "relate[left]", "count"]


def read_one(root, program) -> reader.SplitQuestions:
    """read_split of a train file holding one question with `program`."""
    (root / "questions").mkdir(parents=True)
    rec = {"question": "How many things are left of the cube?", "answer": "1", "image_index": 0, "program": program}
    (root / "questions" / "CLEVR_train_questions.json").write_text(json.dumps({"questions": [rec]}))
    return reader.read_split(root, "train")


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_each_spelling_reads_the_same_for_every_user(tmp_path, spelling):
    program = SPELLINGS[spelling]
    assert execute(program, SCENE) == "1"  # left of the cube (A): C
    assert type_of_program(program) == "count"
    assert program_tokens(program) == TOKENS
    split = read_one(tmp_path, program)
    assert split.types == [QUESTION_TYPES.index("count")]
    assert split.program_tokens == set(TOKENS)


@pytest.mark.parametrize("bad_step, match", [
    ({"inputs": [0], "value_inputs": []}, "program step 1: missing 'function'"),
    ("count", "program step 1: expected an object"),
    ({"function": "count", "inputs": ["0"]}, r"program step 1 \(count\): 'inputs' must be a list"),
    ({"function": "count", "inputs": [0], "value_inputs": "x"},
     r"program step 1 \(count\): 'value_inputs' must be a list"),
])
def test_every_user_names_the_bad_step(tmp_path, bad_step, match):
    program = [{"function": "scene", "inputs": []}, bad_step]
    for user in (lambda p: execute(p, SCENE), type_of_program, program_tokens):
        with pytest.raises(ProgramError, match=match):
            user(program)
    path = tmp_path / "questions" / "CLEVR_train_questions.json"
    with pytest.raises(UserError, match=rf"{path}, record 0 \(line 1\): field 'program', {match}"):
        read_one(tmp_path, program)

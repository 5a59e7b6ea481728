"""The five question types the paper reports, keyed on a program's last function."""
from __future__ import annotations

from fastfilm.data.program import parse_step

QUESTION_TYPES: tuple[str, ...] = ("exist", "count", "compare_integer", "query_attribute", "compare_attribute")
UNKNOWN = -1  # type id of a question whose type cannot be known (no program, unseen family)

TYPE_TITLES = {
    "exist": "Exist",
    "count": "Count",
    "compare_integer": "Compare Integer",
    "query_attribute": "Query Attribute",
    "compare_attribute": "Compare Attribute",
}

_LAST_FUNCTION_TO_TYPE = {
    "exist": "exist",
    "count": "count",
    "equal_integer": "compare_integer",
    "less_than": "compare_integer",
    "greater_than": "compare_integer",
    "query_size": "query_attribute",
    "query_color": "query_attribute",
    "query_material": "query_attribute",
    "query_shape": "query_attribute",
    "equal_size": "compare_attribute",
    "equal_color": "compare_attribute",
    "equal_material": "compare_attribute",
    "equal_shape": "compare_attribute",
}


def type_of_program(program: list[dict]) -> str | None:
    """Question type from a CLEVR program (steps in any spelling program.parse_step accepts),
    or None when the program is empty or ends in a function no type is known for.
    Raises ProgramError (naming the step) when the last step is malformed."""
    if not program:
        return None
    fn, _, _ = parse_step(program[-1], len(program) - 1)
    return _LAST_FUNCTION_TO_TYPE.get(fn)


def type_id(name: str | None) -> int:
    return QUESTION_TYPES.index(name) if name in QUESTION_TYPES else UNKNOWN

"""The five question types the paper reports, keyed on a program's last function."""
from __future__ import annotations

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
    """Question type from a CLEVR program (list of {function|type, inputs, value_inputs}), or None."""
    if not program:
        return None
    last = program[-1]
    # CLEVR v1.0 names the step's function "function"; some tools write "type".
    fn = last.get("function", last.get("type"))
    return _LAST_FUNCTION_TO_TYPE.get(fn)


def type_id(name: str | None) -> int:
    return QUESTION_TYPES.index(name) if name in QUESTION_TYPES else UNKNOWN

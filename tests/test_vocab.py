"""Vocabulary: the original FiLM code's vocab.json layout, tokenization and <UNK> handling."""
import json
import os

import pytest

from fastfilm.data.vocab import SPECIAL_TOKENS, Vocab, program_tokens, tokenize
from fastfilm.errors import UserError

QUESTIONS = [
    {"question": "Are there any red cubes?", "answer": "yes",
     "program": [{"function": "scene", "inputs": [], "value_inputs": []},
                 {"function": "filter_color", "inputs": [0], "value_inputs": ["red"]},
                 {"function": "exist", "inputs": [1], "value_inputs": []}]},
    {"question": "How many  spheres; or cubes, are there.", "answer": "2"},
    {"question": "What color is the cube?", "answer": "red", "program": [{"type": "query_color", "inputs": [0]}]},
]


def test_tokenize_follows_the_original():
    assert tokenize("How many  spheres; or Cubes, are there?") == \
        ["how", "many", "spheres", ";", "or", "cubes", ",", "are", "there"]
    assert tokenize("Is it big.") == ["is", "it", "big"]
    assert tokenize("") == []
    assert tokenize("\t?. ") == []


def test_build_tables():
    v = Vocab.build(QUESTIONS)
    for table in (v.question_token_to_idx, v.answer_token_to_idx, v.program_token_to_idx):
        assert {t: table[t] for t in SPECIAL_TOKENS} == SPECIAL_TOKENS
        assert sorted(table.values()) == list(range(len(table)))
        words = [t for t in table if t not in SPECIAL_TOKENS]
        assert words == sorted(words)  # ids do not depend on question order
    assert set(v.answer_token_to_idx) - set(SPECIAL_TOKENS) == {"yes", "2", "red"}
    assert {"filter_color[red]", "scene", "exist", "query_color"} <= set(v.program_token_to_idx)
    assert ";" in v.question_token_to_idx and "?" not in v.question_token_to_idx
    assert v.idx_to_answer[v.answer_to_idx("red")] == "red"
    assert v.num_answers == 4 + 3
    assert Vocab.build(reversed(QUESTIONS)).fingerprint() == v.fingerprint()


def test_program_tokens():
    steps = [{"function": "filter_size", "value_inputs": ["large"]}, {"type": "count", "inputs": [0]}]
    assert program_tokens(steps) == ["filter_size[large]", "count"]


def test_encode_and_unknown_words_never_crash():
    v = Vocab.build(QUESTIONS)
    ids = v.encode_question("Are there any RED cubes?")
    assert ids[0] == SPECIAL_TOKENS["<START>"] and ids[-1] == SPECIAL_TOKENS["<END>"]
    assert ids[1:-1] == [v.question_token_to_idx[w] for w in ["are", "there", "any", "red", "cubes"]]
    weird = "Is the zebra-striped ünïcode <START> thing there?"
    ids = v.encode_question(weird)
    assert ids.count(SPECIAL_TOKENS["<UNK>"]) == len(v.unknown_words(weird)) == 4
    assert v.unknown_words(weird) == ["zebra-striped", "ünïcode", "<start>", "thing"]
    assert v.encode_question("") == [1, 2]
    assert v.answer_to_idx("purple") == SPECIAL_TOKENS["<UNK>"]


def test_save_load_roundtrip_is_atomic(tmp_path):
    v = Vocab.build(QUESTIONS)
    path = v.save(tmp_path / "sub" / "vocab.json")
    assert os.listdir(path.parent) == ["vocab.json"]  # no temp file left behind
    assert os.stat(path).st_mode & 0o044  # readable by others: a vocab is meant to be shared
    w = Vocab.load(path)
    assert w.to_json() == v.to_json() and w.fingerprint() == v.fingerprint()


def test_fingerprint_sees_any_id_change():
    v = Vocab.build(QUESTIONS)
    tables = v.to_json()
    q = dict(tables["question_token_to_idx"])
    a, b = "red", "cubes"
    q[a], q[b] = q[b], q[a]
    assert Vocab(q, tables["answer_token_to_idx"], tables["program_token_to_idx"]).fingerprint() != v.fingerprint()


def test_loads_original_film_vocab(tmp_path):
    # As ethanjperez/film's preprocess_questions.py writes it (answers carry the specials too).
    original = {
        "question_token_to_idx": {**SPECIAL_TOKENS, "Any": 4, "any": 5, "cube": 6},
        "program_token_to_idx": {**SPECIAL_TOKENS, "scene": 4},
        "answer_token_to_idx": {**SPECIAL_TOKENS, "no": 4, "yes": 5},
    }
    (tmp_path / "vocab.json").write_text(json.dumps(original))
    v = Vocab.load(tmp_path / "vocab.json")
    assert v.idx_to_answer == ["<NULL>", "<START>", "<END>", "<UNK>", "no", "yes"]
    # The original kept case, so a vocab.json of its own is read with case kept.
    assert not v.lowercase
    assert v.encode_question("Any cube? any sphere") == [1, 4, 6, 5, 3, 2]
    assert Vocab.build(QUESTIONS).lowercase


@pytest.mark.parametrize("body, needle", [
    ("{not json", "not a readable vocab.json"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"question_token_to_idx": SPECIAL_TOKENS}), "answer_token_to_idx"),
    (json.dumps({"question_token_to_idx": {"<NULL>": 1}, "answer_token_to_idx": {}}), "question_token_to_idx"),
    (json.dumps({"question_token_to_idx": SPECIAL_TOKENS, "answer_token_to_idx": {"yes": 0, "no": 0}}), "ids"),
])
def test_bad_vocab_files_name_file_and_field(tmp_path, body, needle):
    path = tmp_path / "vocab.json"
    path.write_text(body)
    with pytest.raises(UserError, match=needle) as e:
        Vocab.load(path)
    assert str(path) in str(e.value)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Vocab.load(tmp_path / "nope.json")

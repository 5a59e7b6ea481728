"""Reading CLEVR-layout directories: streaming JSON, split files, programs or none, bad records."""
import json

import pytest
from clevr_fixture import HUMANS, TEST, TRAIN, VAL, make_clevr

from fastfilm.data import reader
from fastfilm.data.types import QUESTION_TYPES, UNKNOWN
from fastfilm.errors import UserError

TYPE = {name: i for i, name in enumerate(QUESTION_TYPES)}


@pytest.fixture
def clevr(tmp_path):
    return make_clevr(tmp_path / "CLEVR_v1.0")


@pytest.fixture
def tiny_chunks(monkeypatch):
    # Records then straddle many chunk boundaries; the margin must stay above any record's size.
    monkeypatch.setattr(reader, "_CHUNK", 7)
    monkeypatch.setattr(reader, "_MARGIN", 1 << 16)


RECORDS = [{"question": 'A "quoted" [bracket], {brace}; ünï', "answer": "yes", "n": 12345678901234},
           {"question": "second", "nested": {"a": [1, 2, {"b": "]"}]}}, {"question": "", "x": -1.5e-3}]


@pytest.mark.parametrize("layout", ["info_first", "info_last", "bare_list", "pretty"])
def test_stream_matches_json_load(tmp_path, tiny_chunks, layout):
    body = {"info_first": {"info": {"version": 1.0, "n": 12}, "questions": RECORDS},
            "info_last": {"questions": RECORDS, "info": {"v": [1, 2]}},
            "bare_list": RECORDS, "pretty": {"questions": RECORDS}}[layout]
    path = tmp_path / "q.json"
    path.write_text(json.dumps(body, indent=2 if layout == "pretty" else None, ensure_ascii=False))
    got = list(reader.stream_records(path, "questions"))
    assert [r for _, _, r in got] == RECORDS
    assert [i for i, _, _ in got] == [0, 1, 2]
    if layout == "pretty":  # lines are counted for error messages
        text = path.read_text().splitlines()
        assert all('{' in text[line - 1] for _, line, _ in got)


def test_stream_empty_list(tmp_path):
    (tmp_path / "q.json").write_text('{"questions": []}')
    assert list(reader.stream_records(tmp_path / "q.json", "questions")) == []


@pytest.mark.parametrize("text, needle", [
    ('{"questions": [{"question": "a"}, {"question" "b"}, {"question": "c"}]}', "record 1"),
    ('{"questions": [{"question": "a"} {"question": "b"}]}', "after record 0"),
    ('{"questions": [{"question": "a"}, {"question": "b"', "record 1"),  # truncated file
    ('{"info": {}}', "no 'questions' list"),
    ('"just a string"', "start of the file"),
    ('', "start of the file"),
])
def test_malformed_json_names_file_and_record(tmp_path, text, needle):
    path = tmp_path / "CLEVR_train_questions.json"
    path.write_text(text)
    with pytest.raises(UserError, match=needle) as e:
        list(reader.stream_records(path, "questions"))
    assert str(path) in str(e.value)


def test_syntax_error_in_a_big_file_is_found_without_reading_on(tmp_path, monkeypatch):
    # Chunks far smaller than the file: the error must be reported where it is, not at EOF.
    monkeypatch.setattr(reader, "_CHUNK", 256)
    monkeypatch.setattr(reader, "_MARGIN", 128)
    records = [json.dumps({"question": f"q{i}", "answer": "yes"}) for i in range(200)]
    records[50] = records[50].replace(":", "", 1)
    path = tmp_path / "q.json"
    path.write_text('{"questions": [\n' + ",\n".join(records) + "\n]}")
    with pytest.raises(UserError, match=r"line 52: malformed JSON in record 50"):
        list(reader.stream_records(path, "questions"))


def test_read_train_with_programs(clevr):
    s = reader.read_split(clevr["root"], "train")
    assert len(s) == len(TRAIN) and s.text == [t for t, *_ in TRAIN]
    assert s.answers == [a for _, a, _, _ in TRAIN]
    assert s.families == [f for _, _, f, _ in TRAIN]
    assert s.types == [TYPE[n] for n in ["exist", "count", "query_attribute", "compare_attribute",
                                         "compare_integer", "exist", "count", "query_attribute"]]
    assert s.image_files[:4] == [f"train/{n}" for n in clevr["train_images"]]
    assert s.image_files[3].endswith(".jpg")
    assert {"filter_color[red]", "count", "scene"} <= s.program_tokens


def test_val_image_names_come_from_image_index(clevr):
    s = reader.read_split(clevr["root"], "val")
    assert s.image_files == ["val/CLEVR_val_000000.png", "val/CLEVR_val_000001.png", "val/CLEVR_val_000000.png"]
    assert s.answers == [a for _, a, _, _ in VAL]


def test_test_split_without_answers_or_programs_gets_types_from_families(clevr):
    train, val = reader.read_split(clevr["root"], "train"), reader.read_split(clevr["root"], "val")
    test = reader.read_split(clevr["root"], "test")
    assert test.answers == [None] * len(TEST) and not any(test.has_program)
    assert test.types == [UNKNOWN] * len(TEST)
    families = reader.family_type_map([train, val])
    assert families == {0: TYPE["exist"], 1: TYPE["count"], 2: TYPE["query_attribute"],
                        3: TYPE["compare_attribute"], 4: TYPE["compare_integer"]}
    assert reader.fill_types(test, families) == 2
    assert test.types == [TYPE["exist"], TYPE["count"], UNKNOWN]  # family 99 was never seen with a program


def test_family_seen_with_two_types_is_unknown(clevr):
    s = reader.read_split(clevr["root"], "train")
    s.types[1] = TYPE["exist"]  # family 1 now appears as count and as exist
    assert reader.family_type_map([s])[1] == UNKNOWN


def test_humans_file_bare_list_no_programs(clevr):
    root = clevr["root"]
    assert reader.question_file(root, "CLEVR-Humans-val").name == "CLEVR-Humans-val.json"
    s = reader.read_split(root, "CLEVR-Humans-val")
    assert s.text == [t for t, _ in HUMANS] and s.types == [UNKNOWN, UNKNOWN] and s.families == [UNKNOWN] * 2
    assert s.image_files == [f"val/{n}" for n in clevr["val_images"]]  # CLEVR's images, found by name


def test_image_dir_from_file_name_prefix(clevr):
    # CLEVR-Humans test questions are about CLEVR *val* images: the file name decides the directory.
    root = clevr["root"]
    recs = [{"question": "q", "answer": "a", "split": "test", "image_filename": "CLEVR_val_000001.png"}]
    (root / "questions" / "CLEVR-Humans-test.json").write_text(json.dumps({"questions": recs}))
    assert reader.read_split(root, "CLEVR-Humans-test").image_files == ["val/CLEVR_val_000001.png"]


def test_cogent_split_names(tmp_path):
    q = tmp_path / "questions"
    q.mkdir()
    for name in ["CLEVR_trainA_questions.json", "CLEVR_valA_questions.json", "CLEVR_valB_questions.json",
                 "CLEVR_trainA_scenes.json"]:
        (q / name).write_text('{"questions": []}')
    assert reader.question_file(tmp_path, "train") is None  # not trainA
    assert reader.question_file(tmp_path, "valB").name == "CLEVR_valB_questions.json"
    assert reader.list_splits(tmp_path) == ["trainA", "valA", "valB"]


def test_ambiguous_question_files(tmp_path):
    q = tmp_path / "questions"
    q.mkdir()
    (q / "mine-train.json").write_text("[]")
    (q / "other_train.json").write_text("[]")
    with pytest.raises(UserError, match="several question files for split 'train'"):
        reader.question_file(tmp_path, "train")


def test_missing_split(clevr):
    with pytest.raises(UserError, match="no question file for split 'trainB'"):
        reader.read_split(clevr["root"], "trainB")


@pytest.mark.parametrize("record, field", [
    ({"answer": "yes", "image_index": 0}, "'question'"),
    ({"question": "q", "answer": ["yes"], "image_index": 0}, "'answer'"),
    ({"question": "q", "answer": "yes"}, "'image_filename' or"),
    ({"question": "q", "image_index": 0, "program": "exist"}, "'program'"),
    ({"question": "q", "image_index": 0, "question_family_index": "3"}, "'question_family_index'"),
    ({"question": "q", "image_filename": "../../etc/passwd"}, "'image_filename'"),
    ("not an object", "JSON object"),
])
def test_bad_record_names_file_record_and_field(clevr, record, field):
    path = clevr["root"] / "questions" / "CLEVR_train_questions.json"
    body = json.loads(path.read_text())
    body["questions"].insert(2, record)
    path.write_text(json.dumps(body, indent=1))
    with pytest.raises(UserError, match=f"record 2 .*{field}") as e:
        reader.read_split(clevr["root"], "train")
    assert str(path) in str(e.value)
    s = reader.read_split(clevr["root"], "train", skip_bad=True)
    assert len(s) == len(TRAIN) and len(s.skipped) == 1 and "record 2" in s.skipped[0]
    assert s.records == [0, 1, *range(3, len(TRAIN) + 1)]  # record indices in the file, after the skip


def test_answers_of_other_json_types(clevr):
    path = clevr["root"] / "questions" / "CLEVR_val_questions.json"
    recs = [{"question": "q", "answer": 3, "image_index": 0}, {"question": "q", "answer": True, "image_index": 1}]
    path.write_text(json.dumps({"questions": recs}))
    assert reader.read_split(clevr["root"], "val").answers == ["3", "yes"]

"""The CLEVR-Humans-style rewording helper (fastfilm/data/reword.py)."""
from __future__ import annotations

import json
import random

from fastfilm.data.questions import _ADJECTIVES, _NOUNS
from fastfilm.data.reword import SYNONYMS, main, reword_file, reword_text
from fastfilm.data.vocab import tokenize


def test_synonyms_are_words_the_generator_never_writes():
    generator_words = {w for words in (*_NOUNS.values(), *_ADJECTIVES.values()) for w in words}
    generator_words |= {w + "s" for w in generator_words}
    new = {w for alternatives in SYNONYMS.values() for w in alternatives}
    assert not new & generator_words
    assert set(SYNONYMS) & generator_words  # and they replace the generator's own words


def test_reword_text_replaces_at_rate_one_keeps_capitals_and_punctuation():
    out = reword_text("Are there any big metal cubes? Cube.", random.Random(0), rate=1.0)
    words = tokenize(out)
    assert out.endswith(".") and out.split()[-1][0].isupper()
    assert words[:3] == ["are", "there", "any"]
    assert words[3] in SYNONYMS["big"] and words[4] in SYNONYMS["metal"] and words[5] in SYNONYMS["cubes"]
    assert reword_text("Are there any big metal cubes?", random.Random(0), rate=0.0) == \
        "Are there any big metal cubes?"


def test_reword_file_drops_programs_and_families_and_is_seeded(generated_clevr, tmp_path, capsys):
    src = generated_clevr / "questions" / "CLEVR_val_questions.json"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    changed = reword_file(src, a, rate=0.5, seed=3)
    assert main([str(src), str(b), "--rate", "0.5", "--seed", "3"]) == 0
    assert a.read_bytes() == b.read_bytes()
    old = json.loads(src.read_text())["questions"]
    new = json.loads(a.read_text())["questions"]
    assert 0 < changed == sum(o["question"] != n["question"] for o, n in zip(old, new))
    for o, n in zip(old, new):
        assert "program" not in n and "question_family_index" not in n
        assert (n["answer"], n["image_filename"]) == (o["answer"], o["image_filename"])
    assert main([str(src), str(b), "--rate", "2"]) == 2
    assert "--rate" in capsys.readouterr().err

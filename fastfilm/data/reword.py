"""Reword a CLEVR question file with synonyms the generator never uses: a CLEVR-Humans-style
set for trying the fine-tuning recipe (docs/finetuning.md) without CLEVR-Humans.

    python -m fastfilm.data.reword SRC.json DST.json [--rate 0.5] [--seed 0]

Each word with an entry in SYNONYMS is replaced, with probability `rate`, by one of them
(seeded: the output is a pure function of the input, rate and seed), so that the questions
mix words a model trained on the generator's data knows with words it has never seen. Like
CLEVR-Humans, the result has no programs and no question families (question types are then
unknown); answers and images are kept. SRC may be DST: the file is read whole first and
replaced atomically.
"""
from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

from fastfilm.atomic import write_json
from fastfilm.data.reader import stream_records
from fastfilm.errors import UserError

# Words of the generator's templates (data/questions.py: its nouns, adjectives and their own
# CLEVR synonyms) -> words it never writes.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "cube": ("box", "brick"), "cubes": ("boxes", "bricks"), "block": ("box", "brick"), "blocks": ("boxes", "bricks"),
    "sphere": ("orb", "globe"), "spheres": ("orbs", "globes"), "ball": ("orb", "globe"), "balls": ("orbs", "globes"),
    "cylinder": ("tube", "drum"), "cylinders": ("tubes", "drums"),
    "thing": ("item",), "things": ("items",), "object": ("item",), "objects": ("items",),
    "large": ("huge", "giant"), "big": ("huge", "giant"), "small": ("little", "mini"), "tiny": ("little", "mini"),
    "metal": ("glossy", "steel"), "metallic": ("glossy", "steel"), "shiny": ("glossy", "steel"),
    "rubber": ("dull", "rubbery"), "matte": ("dull", "rubbery"),
    "color": ("colour", "hue"), "shape": ("form",), "size": ("bigness",),
}
_WORD = re.compile(r"[A-Za-z]+")
_HUMANS_LACK = ("program", "question_family_index")


def reword_text(text: str, rng: random.Random, synonyms: dict[str, tuple[str, ...]] = SYNONYMS,
                rate: float = 0.5) -> str:
    """`text` with each word that has synonyms replaced by one of them with probability `rate`
    (capitalisation kept)."""
    def swap(m: re.Match) -> str:
        word = m.group(0)
        alternatives = synonyms.get(word.lower())
        if not alternatives or rng.random() >= rate:
            return word
        new = rng.choice(alternatives)
        return new.capitalize() if word[0].isupper() else new
    return _WORD.sub(swap, text)


def reword_file(src: str | Path, dst: str | Path, *, rate: float = 0.5, seed: int = 0,
                synonyms: dict[str, tuple[str, ...]] = SYNONYMS) -> int:
    """Write DST: SRC's question records reworded, without programs and families. Returns
    how many questions changed."""
    if not 0 <= rate <= 1:
        raise UserError(f"--rate: must be between 0 and 1, got {rate}")
    rng = random.Random(seed)
    records, changed = [], 0
    for _, _, rec in stream_records(src, "questions"):
        if not isinstance(rec, dict) or not isinstance(rec.get("question"), str):
            raise UserError(f"{src}: every record needs a 'question' string")
        new = {k: v for k, v in rec.items() if k not in _HUMANS_LACK}
        new["question"] = reword_text(rec["question"], rng, synonyms, rate)
        changed += new["question"] != rec["question"]
        records.append(new)
    write_json(Path(dst), {"info": {"reworded_from": str(src), "rate": rate, "seed": seed}, "questions": records},
               indent=None)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastfilm.data.reword", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="CLEVR question file to read")
    p.add_argument("dst", help="question file to write (may be SRC)")
    p.add_argument("--rate", type=float, default=0.5, help="probability that a word with synonyms is replaced")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args(argv)
    try:
        changed = reword_file(args.src, args.dst, rate=args.rate, seed=args.seed)
    except UserError as e:
        print(f"reword: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.dst}: {changed} questions reworded")
    return 0


if __name__ == "__main__":
    sys.exit(main())

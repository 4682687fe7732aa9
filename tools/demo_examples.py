"""Pick the demo model's example pictures for the upload page from easy-VQA's test split, and write them into
vqa_async/demo/examples/ with examples.json (what the model answers, each picture's question and its label).

    python -m tools.demo_examples                  (from the repository's root; needs easy_vqa, a test dependency)

A picture is taken only when the demo model answers every easy-VQA question about it as labelled, so that a
newcomer's first click gets a sensible answer; the four differ in colour (three shapes among them) and ask four
kinds of question. The page shows them on any model whose directory has examples/examples.json
(vqa_async/http/page.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import defaultdict
from pathlib import Path

from vqa_async.model.answer import Answerer
from vqa_async.model.loader import DEMO_MODEL_DIR, load_model
from vqa_async.model.preprocess import decode_image, image_transform

# One example per kind of question, in this order; "is there" and "does the image contain" take the yes/no word
# that differs from the one before, so that both show.
KINDS = ("what shape", "what color", "is there a", "does the image contain")


def easy_vqa_facts() -> tuple[list[str], list[str]]:
    """(shapes, colours), as easy-VQA answers 'what shape' and 'what color' questions, in its own answer order."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    shapes = {a for q, a in zip(questions, answers) if q.startswith("what shape")}
    colours = {a for q, a in zip(questions, answers) if q.startswith("what color")}
    order = easy_vqa.get_answers()
    return [a for a in order if a in shapes], [a for a in order if a in colours]


def pick(limit: int) -> list[dict[str, object]]:
    import easy_vqa

    questions, labels, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    by_image: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for q, a, i in zip(questions, labels, image_ids):
        if i < limit:
            by_image[i].append((q, a))
    loaded = load_model(DEMO_MODEL_DIR)
    answerer = Answerer(loaded.model, loaded.tokenizer, loaded.device, loaded.dtype)
    tf = image_transform(loaded.image_res)
    chosen: list[dict[str, object]] = []
    shapes_taken: set[str] = set()
    colours_taken: set[str | None] = set()
    last_yes_no = ""
    for i in sorted(by_image):
        if len(chosen) == len(KINDS):
            break
        qa = by_image[i]
        shape = next((a for q, a in qa if q.startswith("what shape")), None)
        colour = next((a for q, a in qa if q.startswith(("what color", "what is the color"))), None)
        if shape is None or (shape in shapes_taken and len(shapes_taken) < 3) or colour in colours_taken:
            continue
        kind = KINDS[len(chosen)]
        fits = [(q, a) for q, a in qa if q.startswith(kind) and (kind.startswith("what") or a != last_yes_no)]
        if not fits:
            continue
        pixels = tf(decode_image(Path(paths[i]).read_bytes(), max_pixels=1 << 24))
        got = answerer.answer([pixels], [0] * len(qa), loaded.tokenizer.encode([q for q, _ in qa]))
        if any(g.text != a for g, (_, a) in zip(got, qa)):
            continue
        question, answer = fits[0]
        if not kind.startswith("what"):
            last_yes_no = answer
        shapes_taken.add(shape)
        colours_taken.add(colour)
        chosen.append({"file": f"{i}.png", "source": f"easy-VQA test image {i}", "question": question,
                       "answer": answer, "path": paths[i]})
    if len(chosen) < len(KINDS):
        raise SystemExit(f"only {len(chosen)} pictures fit among the first {limit}: raise --limit")
    return chosen


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEMO_MODEL_DIR / "examples")
    ap.add_argument("--limit", type=int, default=200, help="look at the first LIMIT test images")
    args = ap.parse_args(argv)
    shapes, colours = easy_vqa_facts()
    chosen = pick(args.limit)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    for ex in chosen:
        shutil.copyfile(str(ex.pop("path")), args.out / str(ex["file"]))
    facts = {"dataset": "easy-VQA (https://github.com/vzhou842/easy-VQA, MIT licence): its test split",
             "shapes": shapes, "colours": colours, "examples": chosen}
    (args.out / "examples.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()

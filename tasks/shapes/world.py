"""The shapes world: a synthetic image-text world, deterministic from a seed, written in the real datasets' formats.

Every image is 96x96 RGB on a plain dark background with 1 to 3 objects, each in its own 32 px cell of a 3x3 grid
(centred in it, give or take 2 px, so they never overlap). An object has a shape (circle, square, triangle, cross), a
colour (red, green, blue, yellow, white), a size (small: 13-16 px, big: 23-27 px) and a position (its cell: "at the
top left", "on the left", "in the center", ...). Each image
gets several paraphrased captions ("a big red circle at the top left and a small blue square in the center") and
questions with unique answers of four types:

    colour   "what colour is the circle?" -> "red"              (only about a shape, or size + shape, seen once)
    shape    "what shape is on the left?" -> "triangle"          (one object per cell: always unique)
    count    "how many objects are there?" -> "2", "how many circles are there?" -> "0".."3"
    exists   "is there a red square?" -> "yes" / "no"             (half of each in the evaluation files)

`write_world(root, n_train, n_val, n_test, seed)` writes the images and, so that the real loaders and evaluators run
unchanged, the annotation files in the real datasets' formats (the names are the keys of the returned dict):

    image_root/{image_id:05d}.jpg   every split's images; `image_pattern` is "{image_id:05d}.jpg"
    scenes         scenes.json: the generator's description of every image (objects, captions, split)
    train_captions train.json: LAVIS caption list [{"image", "caption", "image_id"}], one entry per caption
    {val,test}_retrieval        {val,test}.json: [{"image", "caption": [captions], "image_id"}] (retrieval, captioning)
    {val,test}_questions        VQAv2 questions {"questions": [{"image_id", "question", "question_id"}]}
    {val,test}_annotations      VQAv2 annotations {"annotations": [{"question_id", "image_id", "answers" x 10,
                                "multiple_choice_answer", "answer_type", "question_type"}]}
    {val,test}_coco_gt          COCO caption ground truth {"images": [{"id"}], "annotations": [{"image_id", "id",
                                "caption"}]}
    corpus         corpus.txt: text only, for training the language models of stage 0 (train images' scenes plus
                   `n_corpus` text-only scenes): one paragraph per scene, one line per caption, each line the caption
                   followed by question/answer pairs: "<caption> Question: <q> Short answer: <a> Question: ..."
    corpus_val     corpus_val.txt: the same for the validation images (held-out text for the language models)
    manifest       world.json: this dict, plus the world's parameters

`read_corpus` parses a corpus back into scenes of (caption, [(question, answer), ...]); `render_scene` and
`object_mask` draw an image or its per-pixel object labels from a scene description.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "CELL_NAMES",
    "COLOURS",
    "IMAGE_PATTERN",
    "IMAGE_SIZE",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "Obj",
    "answer_question",
    "caption_correct",
    "load_scenes",
    "load_world",
    "make_scene",
    "object_mask",
    "read_corpus",
    "render_scene",
    "sample_questions",
    "scene_captions",
    "scene_questions",
    "vocabulary",
    "write_world",
]

IMAGE_SIZE = 96  # 3 cells of 32 px: 2x2 patches of the shapes ViT (patch 16) each
GRID = 3
IMAGE_PATTERN = "{image_id:05d}.jpg"
SHAPES = ("circle", "square", "triangle", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLOURS = {
    "red": (225, 35, 35),
    "green": (40, 190, 60),
    "blue": (45, 85, 245),
    "yellow": (235, 215, 40),
    "white": (235, 235, 235),
}
# Side length in pixels (a range, drawn uniformly); a grid cell is 32 px, so objects never leave their cell.
SIZES = {"small": (13, 16), "big": (23, 27)}
JITTER = 2
# (row, col) -> the position phrase used in captions and questions.
CELL_NAMES = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
QUESTION_TYPES = ("colour", "shape", "count", "exists")
ANSWER_TYPES = {"colour": "other", "shape": "other", "count": "number", "exists": "yes/no"}
CAPTION_TEMPLATES = 5
QA_PER_LINE = 3  # question/answer pairs after each caption line of the corpus


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (inclusive), at IMAGE_SIZE

    @property
    def position(self) -> str:
        return CELL_NAMES[(self.row, self.col)]

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @classmethod
    def from_dict(cls, d: Mapping) -> Obj:
        return cls(d["shape"], d["colour"], d["size"], int(d["row"]), int(d["col"]), tuple(d["box"]))


# ------------------------------------------------------------------------------------------------------ scenes


def make_scene(rng: random.Random, max_objects: int = 3) -> list[Obj]:
    """1 to `max_objects` objects in distinct grid cells, in reading order (top row first)."""
    n = rng.randint(1, max_objects)
    cells = sorted(rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], n))
    objects = []
    for row, col in cells:
        shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))
        side = rng.randint(*SIZES[size])
        # Centred in the cell, give or take JITTER pixels.
        cx = (2 * col + 1) * IMAGE_SIZE // (2 * GRID) + rng.randint(-JITTER, JITTER)
        cy = (2 * row + 1) * IMAGE_SIZE // (2 * GRID) + rng.randint(-JITTER, JITTER)
        x0, y0 = cx - side // 2, cy - side // 2
        objects.append(Obj(shape, colour, size, row, col, (x0, y0, x0 + side - 1, y0 + side - 1)))
    return objects


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill) -> None:
    x0, y0, x1, y1 = obj.box
    if obj.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif obj.shape == "cross":
        t = max(1, round((x1 - x0 + 1) / 3))  # arm thickness
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((x0, cy - t // 2, x1, cy - t // 2 + t - 1), fill=fill)
        draw.rectangle((cx - t // 2, y0, cx - t // 2 + t - 1, y1), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(objects: list[Obj], background: int = 20) -> Image.Image:
    """The RGB image of a scene on a plain dark grey background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (background,) * 3)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        _draw(draw, obj, COLOURS[obj.colour])
    return img


def object_mask(objects: list[Obj]) -> Image.Image:
    """Per-pixel labels ("L" image): 0 background, i + 1 where object i is drawn."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    for i, obj in enumerate(objects):
        _draw(draw, obj, i + 1)
    return img


# ------------------------------------------------------------------------------------------------------ text


def _caption(objects: list[Obj], template: int) -> str:
    if template == 3:  # position first
        return " and ".join(f"{o.position} {o.phrase()}" for o in objects)
    body = " and ".join(f"{o.phrase()} {o.position}" for o in objects)
    return ("{}", "there is {}", "a picture of {}", None, "{} on a dark background")[template].format(body)


def scene_captions(objects: list[Obj], rng: random.Random, n: int = 5) -> list[str]:
    """`n` distinct paraphrases (1 <= n <= 5): each a different template with its own random object order."""
    if not 1 <= n <= CAPTION_TEMPLATES:
        raise ValueError(f"captions per image must be in 1..{CAPTION_TEMPLATES}, got {n}")
    templates = rng.sample(range(CAPTION_TEMPLATES), n)
    return [_caption(rng.sample(objects, len(objects)), t) for t in templates]


def caption_correct(caption: str, objects: list[Obj]) -> bool:
    """Whether `caption` is one the world's grammar makes for exactly this scene: some template of `_caption` with
    every object named once, in any order, each with its true size, colour, shape and position (case and spacing
    ignored). Strict on purpose: a generated caption that leaves an object out, names one twice or wrongly, adds one,
    is cut off or is not grammatical counts as wrong, since a training caption like that teaches something false or
    nothing. A scene has at most 3! orders x 5 templates candidates, so they are all generated and compared."""
    from itertools import permutations

    text = " ".join(caption.lower().split())
    return any(text == _caption(list(order), t) for order in permutations(objects) for t in range(CAPTION_TEMPLATES))


def scene_questions(objects: list[Obj]) -> list[tuple[str, str, str]]:
    """Every question with a unique answer about the scene: (type, question, answer)."""
    out = []
    shapes = [o.shape for o in objects]
    for shape in SHAPES:
        found = [o for o in objects if o.shape == shape]
        if len(found) == 1:
            out.append(("colour", f"what colour is the {shape}?", found[0].colour))
        for size in SIZES:
            sized = [o for o in found if o.size == size]
            if len(sized) == 1:
                out.append(("colour", f"what colour is the {size} {shape}?", sized[0].colour))
    for o in objects:
        out.append(("shape", f"what shape is {o.position}?", o.shape))
    out.append(("count", "how many objects are there?", str(len(objects))))
    for shape in SHAPES:
        out.append(("count", f"how many {PLURALS[shape]} are there?", str(shapes.count(shape))))
    present = {(o.colour, o.shape) for o in objects}
    for colour in COLOURS:
        for shape in SHAPES:
            answer = "yes" if (colour, shape) in present else "no"
            out.append(("exists", f"is there a {colour} {shape}?", answer))
    return out


def answer_question(objects: list[Obj], question: str) -> str | None:
    """The answer to any question of `scene_questions`, worked out again from the objects (None: not unique)."""
    words = question.rstrip("?").split()
    if question.startswith("what colour is the "):
        size = words[-2] if words[-2] in SIZES else None
        found = [o for o in objects if o.shape == words[-1] and (size is None or o.size == size)]
        return found[0].colour if len(found) == 1 else None
    if question.startswith("what shape is "):
        phrase = question[len("what shape is ") : -1]
        found = [o for o in objects if o.position == phrase]
        return found[0].shape if len(found) == 1 else None
    if question == "how many objects are there?":
        return str(len(objects))
    if question.startswith("how many "):
        shape = {v: k for k, v in PLURALS.items()}[words[2]]
        return str(sum(o.shape == shape for o in objects))
    if question.startswith("is there a "):
        return "yes" if any(o.colour == words[-2] and o.shape == words[-1] for o in objects) else "no"
    return None


def sample_questions(objects: list[Obj], rng: random.Random) -> list[tuple[str, str, str]]:
    """One question per type; "exists" is yes or no with equal chance, "count" half the time the total count."""
    pool = scene_questions(objects)
    chosen = []
    for qtype in QUESTION_TYPES:
        options = [q for q in pool if q[0] == qtype]
        if qtype == "exists":
            want = rng.choice(("yes", "no"))
            options = [q for q in options if q[2] == want] or options
        elif qtype == "count" and rng.random() < 0.5:
            options = options[:1]
        if options:
            chosen.append(rng.choice(options))
    return chosen


def _corpus_lines(objects: list[Obj], captions: list[str], rng: random.Random) -> list[str]:
    lines = []
    for caption in captions:
        qa = sample_questions(objects, rng)
        qa = rng.sample(qa, min(QA_PER_LINE, len(qa)))
        lines.append(caption + "".join(f" Question: {q} Short answer: {a}" for _, q, a in qa))
    return lines


def read_corpus(path: str | Path) -> list[list[tuple[str, list[tuple[str, str]]]]]:
    """Scenes of a corpus file: for each paragraph, its lines as (caption, [(question, answer), ...])."""
    scenes = []
    for paragraph in Path(path).read_text().split("\n\n"):
        lines = []
        for line in paragraph.strip().splitlines():
            caption, *rest = line.split(" Question: ")
            qa = [tuple(part.split(" Short answer: ")) for part in rest]
            if any(len(pair) != 2 for pair in qa):
                raise ValueError(f"{path}: malformed question/answer in line {line!r}")
            lines.append((caption, qa))
        if lines:
            scenes.append(lines)
    return scenes


def vocabulary() -> list[str]:
    """Every word of the world's captions, questions and answers (with '?' and ':' as words), sorted."""
    words = {"?", ":", "question", "short", "answer", "Question", "Short", "yes", "no"}
    words |= set(SHAPES) | set(PLURALS.values()) | set(COLOURS) | set(SIZES) | {str(i) for i in range(GRID * GRID)}
    for phrase in CELL_NAMES.values():
        words |= set(phrase.split())
    for template in range(CAPTION_TEMPLATES):
        words |= set(_caption([Obj("circle", "red", "big", 0, 0, (0, 0, 1, 1))] * 2, template).split())
    for question in ("what colour is the", "what shape is", "how many objects are there", "is there a"):
        words |= set(question.split())
    return sorted(words)


# ------------------------------------------------------------------------------------------------------ files


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _dump(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=None, separators=(",", ":")))
    return path


def write_world(
    root: str | Path,
    n_train: int = 4000,
    n_val: int = 200,
    n_test: int = 200,
    seed: int = 0,
    captions_per_image: int = 5,
    n_corpus: int = 20000,
) -> dict[str, str]:
    """Write the world under `root` (see the module docstring) and return the paths by name.

    Image ids are contiguous over the splits: train 0..n_train-1, then val, then test. `n_corpus` text-only scenes
    (no images) are added to the language models' corpus after the training images' scenes. The same arguments
    give the same bytes.
    """
    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits = {"train": n_train, "val": n_val, "test": n_test}
    scenes = []
    image_id = 0
    for split, n in splits.items():
        rng = random.Random(f"shapes-{seed}-{split}")
        for _ in range(n):
            objects = make_scene(rng)
            background = rng.randint(8, 40)
            captions = scene_captions(objects, rng, captions_per_image)
            name = IMAGE_PATTERN.format(image_id=image_id)
            (images / name).write_bytes(_jpeg(render_scene(objects, background)))
            scenes.append(
                {
                    "image_id": image_id,
                    "image": name,
                    "split": split,
                    "background": background,
                    "objects": [asdict(o) for o in objects],
                    "captions": captions,
                    "questions": [list(q) for q in sample_questions(objects, rng)],
                }
            )
            image_id += 1
    paths = {
        "root": str(root),
        "image_root": str(images),
        "image_pattern": IMAGE_PATTERN,
        "scenes": str(_dump(root / "scenes.json", scenes)),
    }
    by_split = {s: [sc for sc in scenes if sc["split"] == s] for s in splits}
    train = [
        {"image": sc["image"], "caption": c, "image_id": sc["image_id"]}
        for sc in by_split["train"]
        for c in sc["captions"]
    ]
    paths["train_captions"] = str(_dump(root / "train.json", train))
    for split in ("val", "test"):
        rows = by_split[split]
        retrieval = [{"image": sc["image"], "caption": sc["captions"], "image_id": sc["image_id"]} for sc in rows]
        paths[f"{split}_retrieval"] = str(_dump(root / f"{split}.json", retrieval))
        questions, annotations = [], []
        for sc in rows:
            for k, (qtype, question, answer) in enumerate(sc["questions"]):
                qid = sc["image_id"] * 10 + k
                questions.append({"image_id": sc["image_id"], "question": question, "question_id": qid})
                annotations.append(
                    {
                        "question_id": qid,
                        "image_id": sc["image_id"],
                        "question_type": qtype,
                        "answer_type": ANSWER_TYPES[qtype],
                        "multiple_choice_answer": answer,
                        "answers": [
                            {"answer": answer, "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)
                        ],
                    }
                )
        paths[f"{split}_questions"] = str(_dump(root / f"vqa_{split}_questions.json", {"questions": questions}))
        paths[f"{split}_annotations"] = str(_dump(root / f"vqa_{split}_annotations.json", {"annotations": annotations}))
        gt = {
            "info": {"description": f"shapes world {split} captions"},
            "licenses": [],
            "type": "captions",
            "images": [{"id": sc["image_id"], "file_name": sc["image"]} for sc in rows],
            "annotations": [],
        }
        for sc in rows:
            for c in sc["captions"]:
                gt["annotations"].append({"image_id": sc["image_id"], "id": len(gt["annotations"]) + 1, "caption": c})
        paths[f"{split}_coco_gt"] = str(_dump(root / f"coco_{split}_gt.json", gt))

    # The language models' text: the training images' scenes, then text-only scenes; validation scenes held out.
    rng = random.Random(f"shapes-{seed}-corpus")
    paragraphs = []
    for sc in by_split["train"]:
        objects = [Obj.from_dict(o) for o in sc["objects"]]
        paragraphs.append(_corpus_lines(objects, sc["captions"], rng))
    for _ in range(n_corpus):
        objects = make_scene(rng)
        paragraphs.append(_corpus_lines(objects, scene_captions(objects, rng, captions_per_image), rng))
    (root / "corpus.txt").write_text("\n\n".join("\n".join(p) for p in paragraphs) + "\n")
    paths["corpus"] = str(root / "corpus.txt")
    rng = random.Random(f"shapes-{seed}-corpus-val")
    val_paragraphs = [
        _corpus_lines([Obj.from_dict(o) for o in sc["objects"]], sc["captions"], rng) for sc in by_split["val"]
    ]
    (root / "corpus_val.txt").write_text("\n\n".join("\n".join(p) for p in val_paragraphs) + "\n")
    paths["corpus_val"] = str(root / "corpus_val.txt")
    paths["manifest"] = str(root / "world.json")
    params = dict(n_train=n_train, n_val=n_val, n_test=n_test, seed=seed, captions_per_image=captions_per_image)
    _dump(root / "world.json", {"paths": paths, "params": dict(params, n_corpus=n_corpus, image_size=IMAGE_SIZE)})
    return paths


def load_world(world: str | Path | Mapping[str, str]) -> dict[str, str]:
    """The paths dict of a world: given as that dict, as its root folder, or as its world.json."""
    if isinstance(world, Mapping):
        return dict(world)
    path = Path(world)
    if path.is_dir():
        path = path / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"no shapes world at {world} (world.json missing: run write_world first)")
    return json.loads(path.read_text())["paths"]


def load_scenes(world: str | Path | Mapping[str, str], split: str | None = None) -> list[dict]:
    """The scene descriptions of a world (one split, or all), with `objects` as `Obj`s."""
    scenes = json.loads(Path(load_world(world)["scenes"]).read_text())
    out = []
    for sc in scenes:
        if split is None or sc["split"] == split:
            out.append(dict(sc, objects=[Obj.from_dict(o) for o in sc["objects"]]))
    return out

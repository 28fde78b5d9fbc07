"""`qformer demo --capfilt` (tasks/shapes/capfilt.py): the caption checker it measures with and the noisy web captions
it starts from. The variant itself is not run here: its fast path (noisy stage 1, filter, stage-2 captioner, CapFilt)
takes about 90 s on 2 cores, more than the suite's budget has left, and it does not yet reach the issue's
correctness bar (kept captions 9.5 points below the web captions' 50% on the fast demo, 9.2 on the full one)."""

from __future__ import annotations

import random

from tasks.shapes.capfilt import clean_subset, web_captions
from tasks.shapes.world import Obj, caption_correct, make_scene, scene_captions

RED_CIRCLE = Obj("circle", "red", "big", 0, 0, (0, 0, 1, 1))
BLUE_SQUARE = Obj("square", "blue", "small", 1, 1, (0, 0, 1, 1))
SCENE = [RED_CIRCLE, BLUE_SQUARE]


def test_caption_correct_accepts_every_caption_of_the_grammar_and_nothing_else():
    for caption in (
        "a big red circle at the top left and a small blue square in the center",
        "a small blue square in the center and a big red circle at the top left",  # any object order
        "there is a big red circle at the top left and a small blue square in the center",
        "a picture of a small blue square in the center and a big red circle at the top left",
        "in the center a small blue square and at the top left a big red circle",
        "a big red circle at the top left and a small blue square in the center on a dark background",
        "  A big red circle at the top left and a small  blue square in the center ",  # case and spacing
    ):
        assert caption_correct(caption, SCENE), caption
    for caption in (
        "a big red circle at the top left",  # an object left out
        "a big red circle at the top left and a small blue square in the center and a big red circle at the top left",
        "a big green circle at the top left and a small blue square in the center",  # colour
        "a big red cross at the top left and a small blue square in the center",  # shape
        "a small red circle at the top left and a small blue square in the center",  # size
        "a big red circle at the top and a small blue square in the center",  # position
        "a big red circle at the top left and a small blue square",  # cut off
        "at the top left a big red circle and a small blue square in the center",  # mixed word orders
        "there is a picture of a big red circle at the top left and a small blue square in the center",
        "a big red circle at the top left and a small blue square in the center on a dark",
        "",
    ):
        assert not caption_correct(caption, SCENE), caption
    assert caption_correct("a big red circle at the top left", [RED_CIRCLE])


def test_caption_correct_on_the_world_s_own_captions():
    rng = random.Random(0)
    for _ in range(200):
        objects, other = make_scene(rng), make_scene(rng)
        for caption in scene_captions(objects, rng):
            assert caption_correct(caption, objects)
            assert caption_correct(caption, other) == (
                sorted((o.shape, o.colour, o.size, o.row, o.col) for o in objects)
                == sorted((o.shape, o.colour, o.size, o.row, o.col) for o in other)
            )


def test_web_captions_are_half_wrong_and_the_clean_subset_is_true():
    rng = random.Random(0)
    scenes = []
    for i in range(200):
        objects = make_scene(rng)
        scenes.append(
            {"image": f"{i}.jpg", "image_id": i, "objects": objects, "captions": scene_captions(objects, rng)}
        )
    web = web_captions(scenes, 0.5, random.Random(1))
    assert [e["image_id"] for e in web] == list(range(200))
    right = [caption_correct(e["caption"], s["objects"]) for e, s in zip(web, scenes, strict=True)]
    assert sum(right) == 100
    assert all(ok == (e["noise"] == "none") for ok, e in zip(right, web, strict=True))
    assert {e["noise"] for e in web} == {"none", "other_image", "colour", "shape"}
    assert web == web_captions(scenes, 0.5, random.Random(1))  # seeded
    clean = clean_subset(scenes, 0.1, random.Random(2))
    assert len({e["image_id"] for e in clean}) == 20 and len(clean) == 100
    assert all(caption_correct(e["caption"], scenes[e["image_id"]]["objects"]) for e in clean)

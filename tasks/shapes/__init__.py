"""The shapes world: a synthetic demo world and the whole BLIP-2 recipe run in it on a CPU (`qformer demo`).

    world.py    the world generator: scenes of coloured shapes, their captions, questions and answers, written in the
                real datasets' formats (COCO captions, retrieval, VQAv2)
    vit.py      stage 0: a tiny EVA-style ViT trained on the world's images
    lm.py       stage 0: a word-level tokenizer, a tiny OPT and a tiny T5 trained on the world's text
    stage0.py   stage 0 put together (and the BERT folder): `python -m tasks.shapes.stage0 OUT [--fast]`
    demo.py     stages 1 and 2 and the evaluations through the real entry points, with baselines:
                `qformer demo` / `python -m tasks.shapes.demo`
    report.py   the demo's `report.md`: tables, loss curves, gallery
    instruct.py `qformer demo --instruct`: instruction tuning on three question types, the fourth held out

Only a demonstration: the runner (the rest of `tasks/`) never imports this package, and nothing here affects a real
run. It drives the real code (configs, `tasks.train`, `tasks.evaluate`, the loaders and evaluators) like a user does.
"""

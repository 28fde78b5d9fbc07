"""OK-VQA answer lemmatisation as LAVIS applies it (`_lemmatize` in blip2_t5.py / blip2_opt.py), with real spaCy.

en_core_web_sm cannot be downloaded here, so the tests build a real spaCy pipeline in its architecture minus the
statistical tagger: a blank English tokenizer, an `attribute_ruler` whose patterns set the part of speech of the test
words (standing in for the tagger), and spaCy's rule `lemmatizer` with the English tables of spacy-lookups-data (the
mode and tables en_core_web_sm uses). It is saved to disk and loaded by path through `lemmatizer_model`, as users
load a pipeline folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import spacy  # the dev extra installs spaCy and spacy-lookups-data

from qformer.checkpoint import save_pretrained
from qformer.config import LLMConfig
from qformer.stage2 import Blip2Stage2
from tasks.cli import main
from tasks.config import ConfigError
from tasks.evals.config import EvalConfig, load_eval_config
from tasks.evals.lemmatize import LemmatizerUnavailable, lemmatize_answers, load_lemmatizer
from tasks.evals.vqa import evaluate_vqa
from tests.llm_helpers import tiny_opt_folder
from tests.test_cli import tiny_cfg, write_jpegs

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"

# The part of speech each test word has in these answers (en_core_web_sm's tagger decides it there).
POS = {
    "dogs": "NOUN",
    "dog": "NOUN",
    "children": "NOUN",
    "mice": "NOUN",
    "fire": "NOUN",
    "trucks": "NOUN",
    "leaves": "NOUN",
    "boxes": "NOUN",
    "running": "VERB",
    "eating": "VERB",
    "ate": "VERB",
    "went": "VERB",
    "skiing": "VERB",
    "is": "AUX",
    "do": "AUX",
    "n't": "PART",
    "two": "NUM",
    "3": "NUM",
    "10": "NUM",
    "yes": "INTJ",
    "no": "INTJ",
    "red": "ADJ",
    "bigger": "ADJ",
    "wooden": "ADJ",
    "on": "ADP",
    "the": "DET",
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
    """A spaCy pipeline folder: tokenizer, attribute_ruler (POS of the test words), rule lemmatizer (English tables
    from spacy-lookups-data: lemma_rules, lemma_exc, lemma_index)."""
    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("attribute_ruler")
    lemmatizer = nlp.add_pipe("lemmatizer", config={"mode": "rule"})
    nlp.initialize()  # loads the lemmatizer's tables; clears the ruler's patterns, so they come after
    assert set(lemmatizer.lookups.tables) == {"lemma_rules", "lemma_exc", "lemma_index"}
    for word, pos in POS.items():
        ruler.add([[{"LOWER": word}]], {"POS": pos})
    path = tmp_path_factory.mktemp("spacy") / "en_test_pipeline"
    nlp.to_disk(path)
    return str(path)


# Each case: the reference's rule by hand (a NOUN or VERB token -> its lemma, any other -> its text; tokens joined by
# single spaces).
CASES = {
    "dogs": "dog",  # plural noun
    "two dogs": "two dog",  # number kept, plural noun
    "children": "child",  # irregular plural (lemma_exc)
    "fire trucks": "fire truck",  # multi-word answer
    "leaves": "leaf",
    "running": "run",  # verb form
    "went skiing": "go ski",  # irregular past, gerund
    "is eating": "is eat",  # the auxiliary keeps its text
    "children ate mice": "child eat mouse",
    "Dogs": "dog",  # a lemma is lower case
    "red": "red",  # adjective untouched
    "bigger": "bigger",  # adjective untouched, though its lemma is "big"
    "wooden boxes": "wooden box",
    "on the dog": "on the dog",
    "yes": "yes",
    "no": "no",
    "3": "3",
    "10": "10",
    "don't": "do n't",  # spaCy's tokens, joined by spaces
    "": "",
}


def test_answers_lemmatised_as_the_reference_does(pipeline):
    nlp = load_lemmatizer(pipeline)
    assert lemmatize_answers(list(CASES), nlp) == list(CASES.values())
    # The stand-in tagger really tags: "bigger" is an adjective whose lemma differs from its text.
    assert [(t.pos_, t.lemma_) for t in nlp("bigger")] == [("ADJ", "big")]


def test_missing_spacy_or_model_is_one_line_naming_both_fixes(tmp_path, monkeypatch):
    for model in (str(tmp_path / "no_such_pipeline"), "en_core_web_missing"):
        with pytest.raises(LemmatizerUnavailable) as err:
            load_lemmatizer(model)
        message = str(err.value)
        assert "\n" not in message and repr(model) in message
        assert "python -m spacy download en_core_web_sm" in message
        assert "en_core_web_sm-3.8.0-py3-none-any.whl" in message and ".[okvqa]" in message
    blank = tmp_path / "blank"
    spacy.blank("en").to_disk(blank)
    with pytest.raises(LemmatizerUnavailable, match="has no lemmatizer component"):
        load_lemmatizer(str(blank))
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy fails
    with pytest.raises(LemmatizerUnavailable, match="spaCy is not installed: .*python -m spacy download"):
        load_lemmatizer("en_core_web_other")


def test_config_key(tmp_path):
    okvqa = load_eval_config(str(CONFIGS / "okvqa_zeroshot_t5.yaml"))
    assert okvqa.lemmatize and okvqa.lemmatizer_model == "en_core_web_sm"
    assert not load_eval_config(str(CONFIGS / "vqav2_zeroshot_t5.yaml")).lemmatize
    with pytest.raises(ConfigError, match="lemmatize applies to predicted answers"):
        load_eval_config(None, ["task=retrieval", "checkpoint=x", f"output_dir={tmp_path}", "lemmatize=true"])


# ------------------------------------------------------------------------------------------ through the VQA eval

# question_id -> (the model's answer, the annotators' answer x 10)
QA = {
    1: ("two dogs", "2 dogs"),  # scored as "2 dogs" (number words become digits); lemmatised, as "2 dog"
    2: ("dogs", "dog"),  # lemmatised to "dog": all ten match
    3: ("yes", "yes"),
    4: ("running", "running"),  # lemmatised to "run": the annotators' "running" is not lemmatised
}


@pytest.fixture(scope="module")
def vqa(tmp_path_factory) -> dict:
    """A tiny stage-2 checkpoint whose answers are fixed per question, and VQA files in the official format."""
    root = tmp_path_factory.mktemp("okvqa")
    llm = tiny_opt_folder(root / "opt")
    ckpt = save_pretrained(Blip2Stage2(tiny_cfg(llm=LLMConfig(path=str(llm), dtype="fp32"))), root / "ckpt")
    images = write_jpegs(root / "images", n=1)
    questions = [{"image_id": 0, "question": f"question {qid}", "question_id": qid} for qid in QA]
    annotations = [
        {
            "question_id": qid,
            "image_id": 0,
            "question_type": f"type {qid}",
            "answer_type": "other",
            "answers": [{"answer": truth, "answer_id": k} for k in range(1, 11)],
        }
        for qid, (_, truth) in QA.items()
    ]
    (root / "questions.json").write_text(json.dumps({"questions": questions}))
    (root / "annotations.json").write_text(json.dumps({"annotations": annotations}))
    return {"root": root, "ckpt": ckpt, "image_name": images[0].rsplit("/", 1)[1]}


def vqa_config(vqa, out, **changes) -> EvalConfig:
    root = vqa["root"]
    values = dict(
        task="vqa",
        checkpoint=str(vqa["ckpt"]),
        output_dir=str(out),
        questions=str(root / "questions.json"),
        annotations=str(root / "annotations.json"),
        image_root=str(root / "images"),
        image_pattern=vqa["image_name"],
        batch_size=3,
        num_workers=0,
    )
    return EvalConfig(**{**values, **changes})


def fixed_answers(model: Blip2Stage2, monkeypatch) -> None:
    def predict_answers(texts, **kwargs):
        return [QA[int(t.split()[-1])][0] for t in texts]

    monkeypatch.setattr(model, "predict_answers", predict_answers)


def test_vqa_eval_lemmatises_the_prediction_not_the_references(vqa, pipeline, monkeypatch, tmp_path):
    from qformer.checkpoint import load_pretrained

    model = load_pretrained(vqa["ckpt"])
    fixed_answers(model, monkeypatch)
    per_type = {}
    for lemmatize in (False, True):
        out = tmp_path / f"lemmatize_{lemmatize}"
        metrics = evaluate_vqa(model, vqa_config(vqa, out, lemmatize=lemmatize, lemmatizer_model=pipeline), "cpu")
        results = {r["question_id"]: r["answer"] for r in json.loads((out / "results.json").read_text())}
        expected = {qid: answer for qid, (answer, _) in QA.items()}
        if lemmatize:
            expected |= {1: "two dog", 2: "dog", 4: "run"}
            assert metrics["lemmatized_with"] == pipeline
        else:
            assert "lemmatized_with" not in metrics
        assert results == expected  # results.json holds what was scored, as LAVIS saves the lemmatised answers
        per_type[lemmatize] = {int(t.split()[1]): acc for t, acc in metrics["per_question_type"].items()}
    assert per_type[False] == {1: 100.0, 2: 0.0, 3: 100.0, 4: 100.0}
    assert per_type[True] == {1: 0.0, 2: 100.0, 3: 100.0, 4: 0.0}


def test_qformer_eval_without_the_model_is_one_line_before_the_checkpoint_loads(vqa, tmp_path, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the lemmatizer was checked")

    monkeypatch.setattr("qformer.checkpoint.load_pretrained", no_load)
    cfg = vqa_config(vqa, tmp_path / "out")
    overrides = [f"{k}={getattr(cfg, k)}" for k in ("task", "checkpoint", "output_dir", "questions", "annotations")]
    missing = tmp_path / "no_model"
    assert main(["eval", *overrides, "lemmatize=true", f"lemmatizer_model={missing}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qformer eval: error: lemmatize: true: spaCy cannot load")
    assert "python -m spacy download en_core_web_sm" in err[0]

from pathlib import Path

from setuptools import find_packages, setup

EN_CORE_WEB_SM = "https://github.com/explosion/spacy-models/releases/download/en_core_web_sm-3.8.0/en_core_web_sm-3.8.0-py3-none-any.whl"

setup(
    name="qformer",
    version="0.1.0",
    description="BLIP-2 Q-Former research codebase: pretraining, zero-shot VQA, retrieval",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["qformer", "qformer.*", "tasks", "tasks.*"]),
    # torch is left to pip's resolver: timm needs torchvision, and the two must come as a matching pair.
    install_requires=[
        "torch",
        "torchvision",
        "timm>=1.0",
        "transformers>=5,<6",
        "einops",
        "safetensors",
        "omegaconf>=2.3",
        "pillow",
        "tqdm",
        "numpy",
        "webdataset>=1.0,<2",
        "tensorboard",
        "pycocotools",
        "pycocoevalcap",  # BLEU, METEOR, ROUGE-L, CIDEr (METEOR and the PTB tokenizer need Java)
        "matplotlib",
    ],
    extras_require={
        # The tests run spaCy's rule lemmatizer with English tables from spacy-lookups-data (no model download), and
        # CapFilt's open_clip ranker on a tiny CLIP config.
        "dev": ["pytest", "ruff", "spacy>=3.7,<4", "spacy-lookups-data>=1.0", "open_clip_torch"],
        # OK-VQA scoring lemmatises predicted answers (`lemmatize: true`) with spaCy's en_core_web_sm, which is not
        # on PyPI: pip fetches the release wheel from GitHub (or: python -m spacy download en_core_web_sm).
        "okvqa": ["spacy>=3.7,<4", f"en_core_web_sm @ {EN_CORE_WEB_SM}"],
    },
    entry_points={"console_scripts": ["qformer=tasks.cli:main"]},
)

from pathlib import Path

from setuptools import find_packages, setup

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
    extras_require={"dev": ["pytest", "ruff"]},
    entry_points={"console_scripts": ["qformer=tasks.cli:main"]},
)

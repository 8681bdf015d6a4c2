from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="optqa",
    version="0.1.0",
    description="Parameter-efficient (delta) tuning of OPT language models for direct-answer question answering",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["optqa", "optqa.*"]),
    # Ranges run from the lowest versions the suite was run on to the newest it passed on (constraints.txt pins
    # that newest set exactly; .ci/latest tries what came out since). Raise an upper bound only after a green
    # .ci/latest run, in the same commit as the new constraints.txt.
    install_requires=[
        # install torch==2.13.0 first on CPU machines (see README): an open range would pull a CUDA build
        "torch>=2.13,<2.14",
        "transformers>=4.57,<5.26",
        "peft>=0.18,<0.22",
        "safetensors>=0.4.3,<0.9",
        "accelerate>=1.10,<1.17",
        # hf:// pulls, --mode push and the model card (snapshot_download, HfApi, ModelCard)
        "huggingface_hub>=0.34,<3",
        "jsonlines>=4.0,<5",
        "tqdm>=4.66,<5",
        # the learning-curve PNG is part of every run folder, so matplotlib is not optional
        "matplotlib>=3.8,<3.12",
        # the REPL's line editing and history in a terminal (Linux, macOS and the Windows console)
        "prompt_toolkit>=3.0.36,<4",
        # --mode serve: the ASGI app and its server (both run on Windows too)
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
        # --plm_path model.gguf: transformers reads GGUF files (llama.cpp, Ollama) through this package
        "gguf>=0.10,<1",
    ],
    # The serve tests drive the server with the official openai client (its 3.x line brings httpx2, which the
    # tests also use) and the page with selenium on Debian's chromium + chromium-driver.
    # "plot" stays as an empty extra: older instructions say ".[dev,plot]".
    # tensorboard: the tests read back what --report_to tensorboard wrote (users install their own tracker)
    # mkdocs: CI builds docs/ with `mkdocs build --strict`; the plugin includes the top-level ARCHITECTURE.md
    extras_require={"dev": ["pytest>=8,<10", "tokenizers>=0.22,<0.24", "pyyaml>=6,<7", "openai>=3.57,<4",
                            "selenium>=4.11,<5", "tensorboard>=2.21,<3", "mkdocs>=1.6,<2",
                            "mkdocs-include-markdown-plugin>=7.3,<8"],
                    "plot": []},
    package_data={"optqa": ["static/*.html"]},
    entry_points={"console_scripts": ["optqa=optqa.cli:entry"]},
)

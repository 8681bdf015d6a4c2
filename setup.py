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
    install_requires=[
        # install torch==2.13.0 first on CPU machines (see README): an open range would pull a CUDA build
        "torch>=2.1",
        "transformers>=4.46",
        "peft>=0.13",
        "safetensors>=0.4",
        "accelerate>=0.34",
        "jsonlines>=4.0",
        "tqdm>=4.60",
        # the REPL's line editing and history in a terminal (Linux, macOS and the Windows console)
        "prompt_toolkit>=3.0.36,<4",
    ],
    extras_require={"dev": ["pytest>=7", "tokenizers>=0.19"], "plot": ["matplotlib>=3.5"]},
    entry_points={"console_scripts": ["optqa=optqa.cli:main"]},
)

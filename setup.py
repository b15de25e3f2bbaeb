"""rlaifv_jax: RLAIF-V (open-source AI feedback against MLLM hallucination) in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="rlaifv_jax",
    version="0.1.0",
    description="RLAIF-V in JAX/Flax: online AI-feedback alignment of multimodal LLMs",
    packages=find_packages(include=["rlaifv_jax", "rlaifv_jax.*"]),
    package_data={"rlaifv_jax.eval": ["data/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.0",
        "tokenizers",
        "tensorflow-datasets>=4.9",
        "grain>=0.2.18",
        "safetensors",
        "etils[epath]",
        "ml_collections",
        "absl-py",
        "pillow",
        "tqdm",
        "importlib_resources",
        "numpy",
        "pyarrow",
        "tensorboardX",
        "matplotlib",
        "lemminflect",
        "nltk",  # the official scorers' word tokenizer (NLTKWordTokenizer, Punkt); no NLTK data is needed
    ],
    extras_require={
        # torch is the numerical reference in tests only; pinned exactly so pip takes the local CPU wheel.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0"],
        # libtpu for ahead-of-time TPU compilation (python -m rlaifv_jax.plan), pinned to the installed jax.
        "tpu": ["jax[tpu]==0.10.2"],
        # gs:// workdirs and checkpoints (core/paths.py: etils.epath's Cloud Storage backend).
        "gcs": ["gcsfs"],
        # Weights & Biases logging of DPO metrics (--config.log.wandb=True).
        "wandb": ["wandb"],
    },
)

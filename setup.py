"""Model-based curation of image-text corpora (JEST): Beam scoring job and JAX trainer."""

from setuptools import find_packages, setup

setup(
    name="jest-curation",
    version="0.1.0",
    description="Offline scoring (Apache Beam) and online joint example selection (JAX) for image-text pre-training.",
    python_requires=">=3.11,<3.12",
    packages=find_packages(
        include=["models", "models.*", "curation", "curation.*", "pipelines", "pipelines.*", "demo", "demo.*"]
    ),
    # Ranges for users who install the package into their own environment (Dataflow workers use --setup_file);
    # requirements.txt + constraints.txt pin the exact versions tested here.
    install_requires=[
        "apache-beam[gcp]>=2.77,<2.78",
        "tensorflow>=2.21,<2.22",
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "pyarrow>=25,<26",
        "google-cloud-storage>=3.17,<4",
        "google-crc32c>=1.9",
        "gcsfs>=2026.9",
        "pillow>=12.3,<13",
        "numpy>=2.4,<2.5",
        "protobuf>=6.33,<7",
        "tqdm>=4.70",
        "matplotlib>=3.11",
        "tensorboard>=2.21,<2.22",
        "keras-hub>=0.32,<0.33",
    ],
)

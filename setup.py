from setuptools import find_packages, setup

setup(
    name="lmu_jax",
    version="0.1.0",
    description="Scaling-law experiments on LMU, transformer, LSTM and related language models in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lmu_jax", "lmu_jax.*", "tpu", "tpu.*", "benchmarks", "benchmarks.*"]),
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "numpy",
        "sentencepiece",
        "scipy",
        "matplotlib",
        "pyyaml",
        "tqdm",
        "etils[epath]",
        "threadpoolctl",
        "psutil",  # the host's available memory (lmu_jax/train/memory_check.py)
    ],
    extras_require={
        "tfds": ["tensorflow-datasets>=4.9", "array-record"],
        "gcs": ["gcsfs"],  # gs:// paths through etils.epath (orbax/tensorstore need nothing more)
        "tb": ["tensorboardX"],
        # libtpu, for a TPU VM and for compiling for TPU topologies on any Linux x86-64 host (`lmu-jax
        # compile --topology v5e-16`, tests/test_tpu_compile.py); it publishes no wheels elsewhere
        "tpu": ["jax[tpu]; sys_platform == 'linux' and platform_machine == 'x86_64'"],
        # `lmu-jax bench --peers`: PyPI's Linux torch wheel pulls its CUDA libraries too (~2.9 GB of wheels,
        # ~5 GB installed, ~2 min here); it imports and runs on CPU only with them (libtorch links them)
        "peers": ["torch"],
        "dev": ["pytest", "pytest-xdist", "hypothesis", "tensorboardX", "gcsfs", "gcp-storage-emulator"],  # a fake GCS for tests
    },
    entry_points={"console_scripts": ["lmu-jax=lmu_jax.cli:main"]},
)

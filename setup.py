"""lcl-fast: a fast, memory-lean implementation of Latent Compression Learning (LCL)."""

from setuptools import setup

TEST_DEPS = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "pytest-timeout>=2",
    "ruff",
    "pillow",
    "pyarrow",
    "matplotlib",
    "tensorboard",
    # the export tests (tests/export): transformers loads the exported CLIPVisionModel. timm is not here: it
    # requires torchvision, and PyPI's torchvision wheels pin a CUDA build of torch that would replace a
    # CPU torch (and break against it); the timm tests skip without it.
    "transformers>=4.37",
    "safetensors>=0.4",
    "pycocoevalcap",
    # remote data: an S3 filesystem and a real S3 server (moto) for tests/data/test_remote.py
    "fsspec",
    "s3fs",
    "moto[server]",
    "webdataset",  # the reference's loader strategy in benchmarks/bench_data.py
]

setup(
    name="lcl-fast",
    version="0.1.0",
    description=(
        "Latent Compression Learning (vision pre-training on interleaved image-text data): "
        "the reference's mathematics with Triton kernels, a fraction of the memory"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # `kernels/` lives at the top level of the repository but installs as `lcl_fast.kernels`:
    # a top-level `kernels` module would collide with an unrelated PyPI package (transformers >= 5 imports it).
    # Where the repository root is on sys.path, kernels/__init__.py hands `import kernels` over to that package.
    packages=[
        "lcl_fast",
        "lcl_fast.ops",
        "lcl_fast.nn",
        "lcl_fast.data",
        "lcl_fast.model_configs",
        "lcl_fast.training",
        "lcl_fast.export",
        "lcl_fast.eval",
        "lcl_fast.kernels",
    ],
    package_dir={"lcl_fast.kernels": "kernels"},
    package_data={
        "lcl_fast.model_configs": ["*.json"],
        "lcl_fast.data": ["*.txt.gz", "LICENSE*"],
    },
    install_requires=[
        "torch>=2.11,<2.15",
        "triton>=3.6,<3.10; platform_system=='Linux'",
        "numpy",
        "packaging",
        "ftfy",
        "regex",
        "tqdm",
        "pillow",
        "braceexpand",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "obelics": ["pyarrow"],
        "eval": ["pycocoevalcap"],
        # remote shards (fsspec URLs); credentials come from each filesystem's standard environment
        "s3": ["fsspec", "s3fs"],
        "gcs": ["fsspec", "gcsfs"],
        "http": ["fsspec", "aiohttp"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "export": ["transformers>=4.37", "timm>=1.0.16", "safetensors>=0.4"],
        "dev": TEST_DEPS,
    },
    entry_points={"console_scripts": ["lcl-fast-train=lcl_fast.train:main"]},
)

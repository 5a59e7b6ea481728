"""fastfilm: train, verify and serve FiLM visual-reasoning models on CLEVR-style data.

`kernels/` is installed as `fastfilm.kernels` so that no top-level module named
`kernels` lands in site-packages.
"""
from setuptools import find_packages, setup

setup(
    name="fastfilm",
    version="0.1.0",
    description="Fast, verified FiLM (Perez et al. 2017) training and inference on CLEVR-style data",
    python_requires=">=3.10",
    packages=find_packages(include=["fastfilm", "fastfilm.*"]) + ["fastfilm.kernels"],
    package_dir={"fastfilm.kernels": "kernels"},
    # torch is left unpinned so that GPU users bring their own build; on a CPU-only
    # machine install `torch==2.13.0` in the same pip command (see README).
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "triton>=3.0; platform_system == 'Linux'",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        "test": ["pytest>=7", "pytest-benchmark>=4", "nvidia-dali-cuda120"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fastfilm=fastfilm.cli:main"]},
)

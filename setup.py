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
    # The measured decoder speeds `--decoder auto` chooses by (benchmarks/decoder_table.py).
    package_data={"fastfilm.data": ["decoder_speeds.json"]},
    # torch is left unpinned so that GPU users bring their own build; on a CPU-only
    # machine install `torch==2.13.0` in the same pip command (see README).
    install_requires=[
        # torch.library.custom_op/register_fake/register_autograd/opcheck and fused Adam on
        # CPU arrived in 2.4, but the fast path's compiler settings use
        # torch._dynamo.config.recompile_limit, the name 2.7 gave to cache_size_limit (2.6
        # has no such setting). On Linux x86-64, torch's PyPI wheels pin one Triton each
        # (2.7: triton==3.3.0, 2.8: triton==3.4.0), so with the Triton floor below pip
        # resolves torch>=2.8 there.
        "torch>=2.7",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "safetensors>=0.4",
        # kernels/bn_film_relu_residual_triton.py reads triton.knobs.runtime.interpret;
        # triton.knobs first shipped in 3.4.0 (3.3.1 has no triton.knobs).
        "triton>=3.4; platform_system == 'Linux'",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda120"],
        # The tests cover every extra: figures (matplotlib), HDF5 features, TensorBoard, DALI.
        "test": ["pytest>=7", "pytest-benchmark>=4", "nvidia-dali-cuda120", "h5py", "tensorboard", "matplotlib"],
        "plot": ["matplotlib"],
        # HDF5 feature files (clevr-iep's train_features.h5); .npy features need nothing.
        "features": ["h5py"],
        "tensorboard": ["tensorboard"],
    },
    entry_points={"console_scripts": ["fastfilm=fastfilm.cli:main"]},
)

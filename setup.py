"""flowmo-fast: a fast, faithful PyTorch implementation of FlowMo (arXiv 2503.11056)."""

from setuptools import find_packages, setup

# Our import names. The kernels live in `flowmo_kernels`, not `kernels`: Hugging Face's `kernels` distribution
# (installed by transformers 5) has that import name, and two top-level packages of one name shadow each other.
PACKAGES = ("flowmo_fast", "flowmo_kernels", "train", "eval")

setup(
    name="flowmo-fast",
    version="0.1.0",
    description="Fast, faithful FlowMo diffusion-autoencoder image tokenizer",
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "triton>=3.0; platform_system == 'Linux'",
        "einops>=0.7",
        "numpy>=1.24",
        "pillow>=9.0",
        "scipy>=1.10",
        "scikit-image>=0.21",
        "lpips>=0.1.4",
        "torch-fidelity>=0.3",
        "tensorboard>=2.12",
        "matplotlib>=3.5",  # eval.watch's curves.png
        "tqdm>=4.60",
        "huggingface_hub>=0.23",  # from_pretrained("flowmo_lo" | "user/repo"), push_to_hub, model cards
        "safetensors>=0.4",  # model folders of save_pretrained (flowmo_fast.formats.model_folder)
        "webdataset>=0.2.5",  # --data shards/train-{000000..000099}.tar (flowmo_fast.formats.image_shards)
    ],
    extras_require={
        "test": [
            "pytest>=7.0", "pytest-benchmark>=4.0", "pytest-timeout>=2.1", "pytorch-fid>=0.3",
            "transformers>=4.40",  # tests/flowmo_fast/test_llm_infill.py: a tiny random Qwen2, no download
            "setuptools>=70.1",  # tests/test_packaging.py builds a wheel without build isolation (bdist_wheel built in)
        ],
        "llm": ["transformers>=4.40"],  # model.quantization_type=qwen2.5-coder-0.5b (flowmo_fast.flowmo.llm_infill)
        "gpu": ["flash-attn>=2.5", "xformers>=0.0.25", "nvtx>=0.2"],
        "reference": ["mup>=1.0", "omegaconf>=2.1"],  # bench/: upstream's code from $FLOWMO_REFERENCE
    },
)

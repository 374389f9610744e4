"""Installs one import package, ``misotts``.

The repository keeps the design card's folders (``kernels/``, ``runtime/``,
``weights/``, ``bench/``) at the top level; ``package_dir`` maps them under
``misotts.`` so nothing called ``kernels`` or ``runtime`` lands top-level in
site-packages (``kernels`` is a real PyPI package that transformers imports).
"""
from setuptools import setup

SUBPACKAGES = ["kernels", "runtime", "engine", "weights", "bench", "server"]

# The HTTP / WebSocket server (misotts serve); tests need them too, and a real client of each kind.
# audiotsm: the streaming WSOLA time stretch behind `speed`; sentencex: sentence ends for long input
# and the WebSocket (docs/server.md says why these).
SERVER = ["fastapi>=0.110", "uvicorn>=0.29", "av>=12", "prometheus-client>=0.20", "python-multipart>=0.0.9",
          "audiotsm>=0.1.2", "sentencex>=1.0"]
SERVER_TEST = ["httpx", "openai>=1.40", "websockets>=12"]
# Voice-agent frameworks as real clients of the server (tests/server/test_agents.py).  Pipecat pins
# protobuf<7, which breaks ray[serve]'s import (its gRPC code needs protobuf>=7.35), so only
# LiveKit is in "test"; Pipecat's test runs where it is installed apart from [ray].
LIVEKIT = ["livekit-agents>=1.8", "livekit-plugins-openai>=1.8"]
AGENTS = ["pipecat-ai>=1.14", *LIVEKIT]
# The same server on Ray Serve (misotts serve --ray): 2.60 is what the tests run (late-bound ingress apps).
RAY = ["ray[serve]>=2.60"]
# transformers: the tests' and the bench's oracle.  5.25 made the PyPI package `kernels` a hard
# dependency and imports it, and run from this repository's root (python -m puts the working
# directory first on sys.path) our top-level kernels/ folder shadows it: CUDAProperties ImportError.
TRANSFORMERS = "transformers>=5.0,<5.25"
QUALITY = ["jiwer>=3.0", TRANSFORMERS]  # the WER of python -m misotts.bench.quality

setup(
    name="misotts",
    version="0.1.0",
    description="Fast runtime for RVQ text-to-dialogue speech models (MisoTTS, Sesame CSM)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=["misotts"] + [f"misotts.{name}" for name in SUBPACKAGES],
    package_dir={"misotts": "misotts", **{f"misotts.{name}": name for name in SUBPACKAGES}},
    install_requires=[
        # The oldest the tests have passed on (docs/bench.md#tested-versions): torch 2.11 with its
        # triton 3.6 on the GPU machine, torch 2.13 in CI.  triton 3.6's interpreter (the CPU kernel
        # tests) needs numpy < 2.4 (int() of a 1-element array); 3.7.1 fixed it.
        "torch>=2.11",
        "triton>=3.6",
        "safetensors>=0.4",
        "numpy",
        "tokenizers>=0.15",
        "huggingface_hub>=0.20",
        "tqdm",
        "soundfile>=0.12.1",  # audio files (libsndfile >= 1.1 in its wheels: WAV, FLAC, MP3, OGG)
        "soxr>=0.3",  # resampling
        # moshi is installed separately with --no-deps (it pins torch<2.10; its Mimi runs on newer
        # torch); these are the packages its Mimi code imports.
        "einops",
        "sentencepiece",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis>=6.100", *QUALITY, *SERVER, *SERVER_TEST,
                 *RAY, *LIVEKIT],
        "quality": QUALITY,  # python -m misotts.bench.quality: WER through a local ASR model
        "agents": [*SERVER, *AGENTS],
        "server": SERVER,
        "ray": [*SERVER, *RAY],
        "dev": ["pytest", TRANSFORMERS, "matplotlib"],
        "flash": ["flash-attn"],
    },
    entry_points={"console_scripts": ["misotts=misotts.cli:main"]},
)

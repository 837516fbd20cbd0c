# nemo-rlp on the NVIDIA NeMo container: PyTorch, megatron-core, Transformer Engine, Megatron-Bridge,
# mamba-ssm and causal-conv1d come from the image; this adds only the nemo-rlp package.
#   docker build -t nemo-rlp .        (or: enroot import dockerd://nemo-rlp for pyxis)
#
# The tag is pinned. NeMo Framework 26.04 ships Megatron Core 0.17.0, Megatron-Bridge 0.4.0,
# Transformer Engine 2.14 and PyTorch 2.11.0a0 (the "Software Component Versions" table in
# NVIDIA-NeMo/Megatron-Bridge, docs/releases/software-versions.md). The 26.02 release lists its Megatron
# Core as "main:0.16.0", a main-branch build whose version string may be a pre-release that the check
# below rejects; 25.11 has 0.15 ("dev:0.15.0"), too old. The build checks that the image's megatron-core
# is one nemo-rlp supports, so a retagged image cannot slip through.
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.04.00
FROM ${NEMO_IMAGE}

WORKDIR /opt/nemo-rlp
COPY pyproject.toml README.md ./
COPY nemo_rlp ./nemo_rlp
COPY recipes ./recipes
COPY slurm ./slurm

# --no-deps: install nothing the image already has. The check below fails the build if the image
# lacks a dependency or carries a megatron-core outside the supported range.
RUN python -m pip install --no-cache-dir --no-deps -e . \
 && python - <<'PY'
from importlib.metadata import version
from importlib.util import find_spec
from packaging.version import Version
mcore = Version(version("megatron-core"))
assert Version("0.16") <= mcore < Version("0.18"), f"megatron-core {mcore} not in [0.16, 0.18)"
import hydra, omegaconf, tokenizers, torch, tensorboard  # noqa: F401  (all present in the image)
# recipes/import_checkpoint.py converts Hugging Face checkpoints through Megatron-Bridge.
assert find_spec("megatron.bridge") is not None, "Megatron-Bridge (megatron.bridge) is missing from the image"
print(f"nemo-rlp on megatron-core {mcore}, torch {torch.__version__}")
PY

ENV PYTHONUNBUFFERED=1

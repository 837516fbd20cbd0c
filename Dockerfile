# nemo-rlp on the NVIDIA NeMo container: PyTorch, megatron-core, Transformer Engine, Megatron-Bridge,
# mamba-ssm and causal-conv1d come from the image; this adds only the nemo-rlp package.
#   docker build -t nemo-rlp .        (or: enroot import dockerd://nemo-rlp for pyxis)
#
# The tag is pinned to the newest NeMo Framework release whose megatron-core nemo-rlp supports and
# that could be verified: 26.06 ships Megatron Core 0.18.0 (with PyTorch 2.12.0a0, on the PyTorch 26.04
# container), per the "Software Component Versions" table in NVIDIA-NeMo/Megatron-Bridge,
# docs/releases/software-versions.md, as of its tags v0.5.1 and v0.6.0 (26.04 lists 0.17.0; 26.02
# "main:0.16.0", a main-branch build). NeMo 26.08 is said to ship megatron-core 0.19.0, which nemo-rlp
# also supports, but that table (newest snapshot checked: 2026-08-22, tag v0.6.0) does not list 26.08
# yet: move to nvcr.io/nvidia/nemo:26.08.00 once it does. CI runs the tests on megatron-core 0.19.x
# and 0.16.1; on 0.18.0 only the version-sensitive CPU tests were run (Mamba kernels, hybrid model,
# packing), not on a GPU or in this image. The build checks that the image's megatron-core is one
# nemo-rlp supports, so a retagged image cannot slip through.
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.06.00
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
mcore = Version(Version(version("megatron-core")).base_version)  # 0.18.0+nv counts as 0.18.0
assert Version("0.16") <= mcore < Version("0.20"), f"megatron-core {mcore} not in [0.16, 0.20)"
import hydra, omegaconf, tokenizers, torch, tensorboard  # noqa: F401  (all present in the image)
# recipes/import_checkpoint.py converts Hugging Face checkpoints through Megatron-Bridge.
assert find_spec("megatron.bridge") is not None, "Megatron-Bridge (megatron.bridge) is missing from the image"
print(f"nemo-rlp on megatron-core {mcore}, torch {torch.__version__}")
PY

ENV PYTHONUNBUFFERED=1

# nemo-rlp on the NVIDIA NeMo container: PyTorch, megatron-core, Transformer Engine, Megatron-Bridge,
# mamba-ssm and causal-conv1d come from the image; this adds only the nemo-rlp package.
#   docker build -t nemo-rlp .        (or: enroot import dockerd://nemo-rlp for pyxis)
# The tag is pinned; the build checks that its megatron-core is one nemo-rlp supports.
ARG NEMO_IMAGE=nvcr.io/nvidia/nemo:26.02
FROM ${NEMO_IMAGE}

WORKDIR /opt/nemo-rlp
COPY pyproject.toml README.md ./
COPY nemo_rlp ./nemo_rlp
COPY conf ./conf
COPY recipes ./recipes
COPY slurm ./slurm

# --no-deps: install nothing the image already has. The check below fails the build if the image
# lacks a dependency or carries a megatron-core outside the supported range.
RUN python -m pip install --no-cache-dir --no-deps -e . \
 && python - <<'PY'
from importlib.metadata import version
from packaging.version import Version
mcore = Version(version("megatron-core"))
assert Version("0.16") <= mcore < Version("0.18"), f"megatron-core {mcore} not in [0.16, 0.18)"
import hydra, omegaconf, tokenizers, torch, tensorboard  # noqa: F401  (all present in the image)
print(f"nemo-rlp on megatron-core {mcore}, torch {torch.__version__}")
PY

ENV PYTHONUNBUFFERED=1

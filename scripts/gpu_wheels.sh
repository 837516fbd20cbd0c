#!/usr/bin/env bash
# Fill .whl/ with what scripts/gpu_check.sh installs on the lent GPU machine, which has no network.
#
#   bash scripts/gpu_wheels.sh        # here, where pip reaches PyPI; then carry .whl (docs/gpu-results.md)
#
# The machine (the device tool's nvidia-h200, /work/.library/device/KINDS.md) runs Python 3.12 on
# x86-64 Linux and already has torch, numpy, einops, tokenizers, tensorboard, matplotlib, PyYAML,
# packaging, tqdm, psutil, transformers, triton, pytest, pytest-timeout and hypothesis. Of this
# project's dependencies it lacks megatron-core, hydra-core, omegaconf and omegaconf's
# antlr4-python3-runtime: those come as wheels for that Python and platform, at the versions the
# tests run with. Also kept: mamba-ssm's source archive, for its Triton kernels (step 2b); its
# wheels are built per CUDA/torch pair and are not on PyPI.
#
# .whl/ is ignored by git (.gitignore). It travels only when a run names it in `carry`, and the
# working tree plus the carried files must stay under 64 MiB: this script refuses (exit 1) beyond.
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.whl
PYTHON=${PYTHON:-python3}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
LIMIT_MIB=64
BINARY_WHEELS=(megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1)
SOURCE_ONLY=antlr4-python3-runtime==4.9.3   # PyPI has no wheel: built here (pure Python)
MAMBA_SSM=mamba-ssm==2.2.6.post3
# pip matches each manylinux tag exactly: list those the device's glibc accepts.
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

mkdir -p "$DEST"
# One version of each package: a second one stops the whole install on the device.
rm -f "$DEST"/*.whl "$DEST"/*.tar.gz

"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${BINARY_WHEELS[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w "$DEST" "$SOURCE_ONLY"
# pip reads an sdist's metadata by running its setup.py, which for mamba-ssm imports torch and would
# compile CUDA code: skip the build, keep the archive (the Python sources are what step 2b uses).
if ! MAMBA_SKIP_CUDA_BUILD=TRUE "$PYTHON" -m pip download -q --no-deps --no-binary=:all: \
        --no-build-isolation -d "$DEST" "$MAMBA_SSM"; then
    echo "gpu_wheels: could not fetch $MAMBA_SSM's sources (its setup.py needs torch here);" \
         "step 2b will say SKIPPED" >&2
fi

echo "gpu_wheels: $DEST/ for Python $DEVICE_PYTHON, x86-64 manylinux:"
for file in "$DEST"/*; do
    awk -v b="$(stat -c %s "$file")" -v f="${file##*/}" 'BEGIN { printf "  %9.2f MiB  %s\n", b / 1048576, f }'
done
carried=$(du -cb "$DEST"/* | tail -n 1 | cut -f 1)
# What travels besides: the working tree's tracked and untracked-not-ignored files.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f 1)
total=$((carried + tree))
awk -v c="$carried" -v t="$tree" -v s="$total" -v l="$LIMIT_MIB" 'BEGIN {
    printf "gpu_wheels: carried %.2f MiB + working tree %.2f MiB = %.2f MiB of the %d MiB a run may send\n",
        c / 1048576, t / 1048576, s / 1048576, l }'
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "gpu_wheels: over $LIMIT_MIB MiB: the device run would be refused; carry less" >&2
    exit 1
fi

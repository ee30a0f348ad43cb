#!/usr/bin/env bash
# Stage, on a machine with PyPI, what the GPU machine (Python 3.12, transformers 5.17, no registry)
# needs to run hybrid and state-space models: Transformers >= 5.23 (its linear-attention cache
# layers) with the packages it needs newer than 5.17's, and fla (flash-linear-attention, Triton
# kernels for Gated DeltaNet and friends). Writes .hybridwheels/ (git-ignored) with an env.sh;
# carry `.hybridwheels` and start each command with `source .hybridwheels/env.sh &&`. Hybrid
# models run on the PyTorch attention backend, so FlashInfer's `.devwheels` is not needed (the
# two do not fit the 64 MiB a run may carry together).
set -euo pipefail
cd "$(dirname "$0")/.."
out=.hybridwheels
rm -rf "$out" && mkdir -p "$out"
py=(--python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux_2_28_x86_64)
# transformers 5.25 needs huggingface_hub >= 2.4 (5.17 pins < 2.0) and kernels; their new deps too.
pip download -q --no-deps "${py[@]}" -d "$out" transformers==5.25.0 huggingface_hub==2.5.0 kernels==0.19.1 \
    tomlkit hf_xet httpx2 httpcore2 h11 anyio idna truststore click fsspec filelock einops \
    flash-linear-attention==0.6.0 fla-core==0.6.0
cat > "$out/env.sh" <<'ENV'
# Sourced at the start of a command on the GPU machine: installs the staged wheels into a
# scratch folder ahead of the machine's own packages, and puts the project on the path.
HF_CB_HYBRID_SITE=${TMPDIR:-/var/tmp}/hf_cb_hybrid_site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$HF_CB_HYBRID_SITE" .hybridwheels/*.whl || return 1
export PYTHONPATH=$HF_CB_HYBRID_SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
ENV
du -sh "$out"

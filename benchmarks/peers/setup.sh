#!/usr/bin/env bash
# A virtual environment for the peers (lightly, byol-pytorch) and scikit-learn (the probe benchmark's
# reference): not project dependencies, so they live apart from byolcli's environment. torch/torchvision resolve to the same builds
# byolcli uses (pip's constraints file on this machine pins them), so both sides run the same kernels.
#
#   bash benchmarks/peers/setup.sh        → benchmarks/peers/.venv
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install --quiet "torch>=2.4" "torchvision>=0.19" "lightly>=1.5" "byol-pytorch>=0.8" scikit-learn pillow numpy
.venv/bin/python -c "import lightly, byol_pytorch, sklearn, torch; print('lightly', lightly.__version__, '| byol-pytorch ok | scikit-learn', sklearn.__version__, '| torch', torch.__version__)"

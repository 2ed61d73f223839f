#!/usr/bin/env bash
# Installs the Debian photo packages the real-photo benchmarks are built from (as root), so that
# `python benchmarks/retrieval.py` and `python benchmarks/quality.py` build their full presets
# (60 queries, 1,040 database images for "large") and the README's figures can be reproduced.
# Without them the scripts stop and print this command (or, with --allow-smaller, build a smaller
# benchmark and say that the README's figures do not apply). `clustermac demo` runs either way.
# The packages are clustermac.bench.photo_benchmark.PHOTO_PACKAGES (a test checks they agree).
set -euo pipefail
apt-get update
DEBIAN_FRONTEND=noninteractive apt-get install -y opencv-doc lomiri-wallpapers-16.04 mate-backgrounds plasma-workspace-wallpapers

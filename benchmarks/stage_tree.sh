#!/bin/sh
# A folder for PYTHONPATH holding a tree's acttail/ with its kernels/ as acttail/kernels (what setup.cfg
# installs), without installing: runs of two trees side by side on the device.
#   sh benchmarks/stage_tree.sh SRC DEST     (SRC: a checkout, or `git archive REV acttail kernels` unpacked)
set -e
rm -rf "$2"
mkdir -p "$2"
cp -r "$1/acttail" "$2/acttail"
rm -rf "$2/acttail/kernels"
cp -r "$1/kernels" "$2/acttail/kernels"

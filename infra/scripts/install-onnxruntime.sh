#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library (libonnxruntime.so.1) that the ONNX
# model detector loads through github.com/yalue/onnxruntime_go, from the npm
# package onnxruntime-node (the only registry this project may reach that
# ships a prebuilt runtime). The version is pinned and the tarball checked
# against its npm sha512 integrity before anything is unpacked.
#
# The library lands in <cache>/onnxruntime/<version>/libonnxruntime.so.1
# (<cache> defaults to .cache in the repository) with a `current` symlink
# beside it; `vigil` looks there, or at models.onnxruntime_library.
# Idempotent and quiet when the library is already there.
#
# onnxruntime_go v1.27 speaks ORT C API version 24, which any ONNX Runtime
# 1.24.x or newer serves.
# Usage: install-onnxruntime.sh [cache-dir]
set -euo pipefail
VERSION=1.24.3
INTEGRITY=sha512-JH7+czbc8ALA819vlTgcV+Q214/+VjGeBHDjX81+ZCD0PCVCIFGFNtT0V4sXG/1JXypKPgScQcB3ij/hk3YnTg==
cache=${1:-$(cd "$(dirname "$0")/../.." && pwd)/.cache}
dest="$cache/onnxruntime/$VERSION"
lib="$dest/libonnxruntime.so.1"
if [ -s "$lib" ]; then
  ln -sfn "$VERSION" "$cache/onnxruntime/current"
  exit 0
fi
command -v npm >/dev/null || { echo "install-onnxruntime.sh: npm is needed to fetch onnxruntime-node@$VERSION" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching libonnxruntime.so.1 from npm onnxruntime-node@$VERSION" >&2
(cd "$tmp" && npm pack "onnxruntime-node@$VERSION" --silent >/dev/null 2>npm.log) ||
  { cat "$tmp/npm.log" >&2; echo "install-onnxruntime.sh: npm pack onnxruntime-node@$VERSION failed" >&2; exit 1; }
tgz="$tmp/onnxruntime-node-$VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$got" != "$INTEGRITY" ]; then
  echo "install-onnxruntime.sh: onnxruntime-node-$VERSION.tgz integrity $got, want $INTEGRITY" >&2
  exit 1
fi
case "$(uname -m)" in
  x86_64) arch=x64 ;;
  aarch64) arch=arm64 ;;
  *) echo "install-onnxruntime.sh: no onnxruntime-node build for $(uname -m)" >&2; exit 1 ;;
esac
member="package/bin/napi-v6/linux/$arch/libonnxruntime.so.1"
tar -xzf "$tgz" -C "$tmp" "$member"
mkdir -p "$dest"
install -m 0644 "$tmp/$member" "$lib.tmp"
mv "$lib.tmp" "$lib"
ln -sfn "$VERSION" "$cache/onnxruntime/current"

#!/usr/bin/env bash
# Installs what Vigil needs on a Debian machine with Go, idempotently and
# quietly when everything is already there:
#   - clickhouse-server and clickhouse-client (Debian's 18.16.1) for the local
#     and test ClickHouse, started as a child process, never as a system service;
#   - kcat, to look at the embedded broker's topics;
#   - protoc, for `make generate`.
# Usage: install-deps.sh [runtime|generate|all]
set -euo pipefail
what=${1:-runtime}

need=()
case "$what" in
  runtime) pkgs=(clickhouse-server clickhouse-client kcat) ;;
  generate) pkgs=(protobuf-compiler) ;;
  all) pkgs=(clickhouse-server clickhouse-client kcat protobuf-compiler) ;;
  *) echo "install-deps.sh: unknown target '$what' (want runtime, generate or all)" >&2; exit 2 ;;
esac
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
[ ${#need[@]} -eq 0 ] && exit 0

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# The package's maintainer scripts try to start a system service; a
# policy-rc.d refusal there is expected and harmless (we run our own child).
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null

#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf Python code from protocol/*.proto.
#
#   scripts/gen_proto.sh            # rewrite protocol/*_pb2*.py(i) in place
#   scripts/gen_proto.sh OUT_DIR    # write them under OUT_DIR/protocol/ instead
#                                   # (tests/test_proto_drift.py compares the two)
#
# Needs grpcio-tools (pip install -e '.[test]'). protoc runs from the repository
# root with `-I .`, so the generated modules import each other as
# `from protocol import control_pb2` and need no path hacks.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root}"
mkdir -p "$out/protocol"
cd "$root"

python -m grpc_tools.protoc \
  -I . \
  --python_out="$out" \
  --pyi_out="$out" \
  --grpc_python_out="$out" \
  protocol/control.proto

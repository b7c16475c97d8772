"""The committed generated code in protocol/ must be exactly what scripts/gen_proto.sh makes.

Run: python -m pytest tests/test_proto_drift.py -q
Fix a failure with: scripts/gen_proto.sh  (then commit the regenerated files)
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ["control_pb2.py", "control_pb2_grpc.py", "control_pb2.pyi"]


def test_generated_control_code_matches_proto(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is in the [test] extra")
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, timeout=60)
    produced = sorted(p.name for p in (tmp_path / "protocol").iterdir())
    assert produced == sorted(GENERATED), "gen_proto.sh produced an unexpected set of files"
    for name in GENERATED:
        fresh = (tmp_path / "protocol" / name).read_text()
        committed = (ROOT / "protocol" / name).read_text()
        assert committed == fresh, (
            f"protocol/{name} differs from what scripts/gen_proto.sh generates from "
            "protocol/control.proto; run scripts/gen_proto.sh and commit the result"
        )


def test_generated_code_imports_as_a_package() -> None:
    # The grpc module must import its sibling through the package, not via sys.path tricks.
    text = (ROOT / "protocol" / "control_pb2_grpc.py").read_text()
    assert "from protocol import control_pb2" in text
    from protocol import control_pb2, control_pb2_grpc

    assert control_pb2_grpc.ControlStub
    assert control_pb2.DESCRIPTOR.package == "swarmtune.control.v1"

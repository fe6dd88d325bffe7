"""The contract: proto/backend.proto is wire-identical to ../shared/backend.proto, and the
committed stubs were generated from it."""

from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "backend.proto"


def compile_descriptor(proto: Path, tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    from grpc_tools import protoc

    out = tmp_path / f"{proto.parent.name}.pb"
    rc = protoc.main(["protoc", f"-I{proto.parent}", f"--descriptor_set_out={out}", proto.name])
    assert rc == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return fds.file[0]


def wire(fd: descriptor_pb2.FileDescriptorProto) -> bytes:
    """The descriptor without what does not reach the wire (comments, JSON names)."""
    fd = descriptor_pb2.FileDescriptorProto.FromString(fd.SerializeToString())
    fd.ClearField("source_code_info")

    def strip(messages):
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            strip(m.nested_type)

    strip(fd.message_type)
    return fd.SerializeToString(deterministic=True)


@pytest.mark.skipif(not SHARED.exists(), reason="../shared/backend.proto not beside this checkout")
def test_proto_matches_shared(tmp_path):
    ours = compile_descriptor(ROOT / "proto" / "backend.proto", tmp_path)
    (tmp_path / "shared").mkdir()
    theirs = compile_descriptor(SHARED, tmp_path / "shared")
    assert wire(ours) == wire(theirs)
    assert len(ours.service[0].method) == 34


def test_stubs_match_proto(tmp_path):
    from mlxbackend.proto import backend_pb2

    stub = descriptor_pb2.FileDescriptorProto.FromString(backend_pb2.DESCRIPTOR.serialized_pb)
    ours = compile_descriptor(ROOT / "proto" / "backend.proto", tmp_path)
    assert wire(stub) == wire(ours)

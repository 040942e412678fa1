"""The Open Inference Protocol endpoint, driven by the real tritonclient against a real server."""
from __future__ import annotations

import tempfile
from pathlib import Path

from google.protobuf import descriptor_pool
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: F401  (registers Triton's own)

from server import kserve_proto


# ----------------------------------------------------------------------------- protocol files
def test_descriptor_set_is_fresh() -> None:
    """The committed grpc_service.desc is what protoc makes of the committed .proto files."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = kserve_proto.generate(Path(tmp)).read_bytes()
    assert fresh == kserve_proto.DESC_PATH.read_bytes(), (
        "protos/inference/grpc_service.desc is stale: run .venv/bin/python -m server.kserve_proto")


def _same_enum(ours, theirs) -> None:
    for v in ours.values:
        assert theirs.values_by_name[v.name].number == v.number, (ours.full_name, v.name)


def _same_message(ours, theirs) -> None:
    for f in ours.fields:
        assert f.name in theirs.fields_by_name, (ours.full_name, f.name)
        t = theirs.fields_by_name[f.name]
        assert (f.number, f.type, f.is_repeated) == (t.number, t.type, t.is_repeated), (ours.full_name, f.name)
        if f.message_type is not None:
            assert f.message_type.full_name == t.message_type.full_name
        if f.enum_type is not None:
            assert f.enum_type.full_name == t.enum_type.full_name
    for o in ours.oneofs:
        assert {f.name for f in o.fields} <= {f.name for f in theirs.oneofs_by_name[o.name].fields}
    for n in ours.nested_types:
        _same_message(n, theirs.nested_types_by_name[n.name])
    for e in ours.enum_types:
        _same_enum(e, theirs.enum_types_by_name[e.name])


def test_wire_compatible_with_tritonclient_in_the_same_process() -> None:
    """Every message, field, enum and RPC we declare matches Triton's, and both load side by side."""
    pb = kserve_proto.messages()
    theirs = descriptor_pool.Default()
    assert pb.pool is not theirs
    for cls in pb.classes.values():
        d = cls.DESCRIPTOR
        _same_message(d, theirs.FindMessageTypeByName(d.full_name))
    for name in ("DataType",):
        _same_enum(pb.pool.FindEnumTypeByName(f"inference.{name}"),
                   theirs.FindEnumTypeByName(f"inference.{name}"))
    ours = pb.pool.FindServiceByName(kserve_proto.SERVICE)
    their_service = theirs.FindServiceByName(kserve_proto.SERVICE)
    for m in ours.methods:
        t = their_service.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (t.input_type.full_name,
                                                                     t.output_type.full_name)
        assert (m.client_streaming, m.server_streaming) == (t.client_streaming, t.server_streaming)
    # a message made by one side parses on the other
    req = pb.ModelInferRequest(model_name="tiny", id="7")
    req.parameters["sequence_id"].string_param = "abc"
    back = service_pb2.ModelInferRequest.FromString(req.SerializeToString())
    assert back.parameters["sequence_id"].string_param == "abc" and back.id == "7"

"""The committed Python stubs are exactly what scripts/gen_proto.py makes from serve/zenjax/v1/zenjax.proto,
and the contract keeps its versioned shape (package zenjax.v1, the four RPCs, streaming Generate)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen_proto():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_match_the_proto():
    gen = _gen_proto()
    fresh = gen.generate()
    assert set(fresh) == {"zenjax_pb2.py", "zenjax_pb2.pyi", "zenjax_pb2_grpc.py"}
    for name, text in fresh.items():
        committed = (ROOT / "zenjax" / "serve" / name).read_text()
        assert committed == text, f"zenjax/serve/{name} is stale: run scripts/gen_proto.py"
    assert gen.main(["--check"]) == 0


def test_contract_shape():
    from zenjax.serve import zenjax_pb2 as pb
    from zenjax.serve import zenjax_pb2_grpc  # noqa: F401  (imports as zenjax.serve.*)
    assert pb.DESCRIPTOR.package == "zenjax.v1"
    assert pb.DESCRIPTOR.name == "zenjax/v1/zenjax.proto"
    svc = pb.DESCRIPTOR.services_by_name["Inference"]
    methods = {m.name: m for m in svc.methods}
    assert set(methods) == {"Generate", "Tokenize", "Detokenize", "ModelInfo"}
    assert methods["Generate"].server_streaming and not methods["Generate"].client_streaming
    assert not methods["Tokenize"].server_streaming
    # the request's prompt is one of three forms; sampling fields with a non-zero default have presence
    req = pb.GenerateRequest.DESCRIPTOR
    assert {f.name for f in req.oneofs_by_name["prompt"].fields} == {"text", "token_ids", "chat"}
    sp = pb.SamplingParams.DESCRIPTOR
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        assert sp.fields_by_name[name].has_presence, name
    assert {f.name for f in pb.GenerateResponse.DESCRIPTOR.oneofs_by_name["event"].fields} == \
        {"progress", "delta", "finished"}
    assert pb.FinishReason.Name(3) == "FINISH_REASON_CANCELLED"


def test_readme_grpcurl_bodies_parse_as_their_request_types():
    """Every `grpcurl -d '<json>' ... Service/Method` line of serve/README.md is valid for that method."""
    import re

    from google.protobuf import json_format
    from grpc_health.v1 import health_pb2

    from zenjax.serve import zenjax_pb2 as pb
    readme = (ROOT / "serve" / "README.md").read_text()
    calls = re.findall(r"-d '(\{.*?\})' \S+ ([\w.]+)/(\w+)", readme)
    assert len(calls) >= 5, calls
    files = {"zenjax.v1.Inference": pb.DESCRIPTOR, "grpc.health.v1.Health": health_pb2.DESCRIPTOR}
    modules = {"zenjax.v1.Inference": pb, "grpc.health.v1.Health": health_pb2}
    for body, service, method in calls:
        svc = files[service].services_by_name[service.rsplit(".", 1)[1]]
        input_type = svc.methods_by_name[method].input_type
        msg = getattr(modules[service], input_type.name)()
        json_format.Parse(body, msg)                  # raises on unknown fields or bad values

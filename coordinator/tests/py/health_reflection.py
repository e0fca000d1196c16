"""A client of another gRPC implementation (Python's grpcio) against a real `ablate serve`.

Usage: health_reflection.py HOST:PORT ADMIN_TOKEN SWEEP_NAME

Two ways in, as operators' tools and other teams' clients come:
- Without stubs: lists the services by server reflection, checks health with
  grpcio-health-checking (no token), then builds SweepService.List's messages from the descriptors
  reflection serves and calls it with the admin token (and without: refused).
- With stubs that grpcio-tools generates here from the repository's proto/ablate.proto: checks
  that the reflected SweepService and WorkerService have the same methods and message types as the
  file, then calls SweepService.List and Get, resubmits the sweep's own trials (the store already
  has every one: nothing is added), and cancels an unknown sweep (NOT_FOUND).
Prints one JSON object on stdout; any failure raises (non-zero exit).
"""
import importlib.resources
import json
import pathlib
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_tools import protoc

target, token, sweep_name = sys.argv[1], sys.argv[2], sys.argv[3]
admin = [("authorization", "Bearer " + token)]
channel = grpc.insecure_channel(target)
grpc.channel_ready_future(channel).result(timeout=10)

# Reflection: list the services.
stub = reflection_pb2_grpc.ServerReflectionStub(channel)
answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
services = sorted(s.name for a in answers for s in a.list_services_response.service)

# Health, without a token.
health = health_pb2_grpc.HealthStub(channel)
statuses = {}
for name in ["", "ablate.v1.SweepService", "ablate.v1.WorkerService"]:
    r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
    statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
try:
    health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    unknown_health = "OK"
except grpc.RpcError as e:
    unknown_health = e.code().name

# SweepService.List from reflected descriptors, with and without the admin token.
pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
method = pool.FindServiceByName("ablate.v1.SweepService").FindMethodByName("List")
Req = message_factory.GetMessageClass(method.input_type)
Resp = message_factory.GetMessageClass(method.output_type)
call = channel.unary_unary(
    "/ablate.v1.SweepService/List",
    request_serializer=Req.SerializeToString,
    response_deserializer=Resp.FromString,
)
listed = call(Req(), metadata=admin, timeout=10)
try:
    call(Req(), timeout=10)
    anonymous = "OK"
except grpc.RpcError as e:
    anonymous = e.code().name

# Stubs generated from the repository's proto file.
proto_dir = pathlib.Path(__file__).resolve().parents[3] / "proto"
out = tempfile.mkdtemp(prefix="ablate-stubs-")
include = str(importlib.resources.files("grpc_tools") / "_proto")
rc = protoc.main(
    [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        str(proto_dir / "ablate.proto"),
    ]
)
if rc != 0:
    raise SystemExit(f"grpc_tools.protoc failed on {proto_dir / 'ablate.proto'}: {rc}")
sys.path.insert(0, out)
import ablate_pb2  # noqa: E402
import ablate_pb2_grpc  # noqa: E402


def signature(service):
    return sorted(
        (m.name, m.input_type.full_name, m.output_type.full_name) for m in service.methods
    )


schema_mismatch = []
for name in ["SweepService", "WorkerService"]:
    mine = signature(ablate_pb2.DESCRIPTOR.services_by_name[name])
    served = signature(pool.FindServiceByName("ablate.v1." + name))
    if mine != served:
        schema_mismatch.append({"service": name, "file": mine, "served": served})

sweeps = ablate_pb2_grpc.SweepServiceStub(channel)
stub_list = sweeps.List(ablate_pb2.ListRequest(), metadata=admin, timeout=10)
got = sweeps.Get(ablate_pb2.GetRequest(sweep=sweep_name), metadata=admin, timeout=10)
trials = [
    {"id": t.id, "name": t.name, "state": t.state, "method": t.method} for t in got.trials
]
again = sweeps.Submit(
    ablate_pb2.SubmitRequest(
        sweep_name=sweep_name,
        sweep_text=got.sweep_text,
        trials=[ablate_pb2.SubmittedTrial(id=t.id, config_json=t.config_json) for t in got.trials],
    ),
    metadata=admin,
    timeout=10,
)
try:
    sweeps.Cancel(ablate_pb2.CancelRequest(sweep="no-such-sweep"), metadata=admin, timeout=10)
    cancel_unknown = "OK"
except grpc.RpcError as e:
    cancel_unknown = e.code().name

print(
    json.dumps(
        {
            "services": services,
            "health": statuses,
            "unknown_health": unknown_health,
            "sweeps": [s.name for s in listed.sweeps],
            "anonymous_list": anonymous,
            "schema_mismatch": schema_mismatch,
            "stub_sweeps": [s.name for s in stub_list.sweeps],
            "stub_trials": trials,
            "resubmit_added": list(again.added),
            "resubmit_present": sorted(again.already_present),
            "resubmit_sweep_id": again.sweep_id,
            "get_sweep_id": got.sweep_id,
            "cancel_unknown": cancel_unknown,
        }
    )
)

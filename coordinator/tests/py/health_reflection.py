"""A client of another gRPC implementation (Python's grpcio) against a real `ablate serve`.

Usage: health_reflection.py URL_HOST:PORT ADMIN_TOKEN

Without any stubs generated from ablate.proto: lists the services by server reflection, checks
health with grpcio-health-checking (no token), then builds SweepService.List's messages from the
descriptors reflection serves and calls it with the admin token (and without: refused).
Prints one JSON object on stdout; any failure raises (non-zero exit).
"""
import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

target, token = sys.argv[1], sys.argv[2]
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
listed = call(Req(), metadata=[("authorization", "Bearer " + token)], timeout=10)
try:
    call(Req(), timeout=10)
    anonymous = "OK"
except grpc.RpcError as e:
    anonymous = e.code().name

print(
    json.dumps(
        {
            "services": services,
            "health": statuses,
            "sweeps": [s.name for s in listed.sweeps],
            "anonymous_list": anonymous,
        }
    )
)

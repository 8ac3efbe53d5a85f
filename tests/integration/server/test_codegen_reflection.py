"""The generated code matches the .proto files, and the server describes itself by reflection."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

ROOT = Path(__file__).resolve().parents[3]


def test_generated_code_is_up_to_date():
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen-proto"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "up to date" in r.stdout


def test_generated_modules_import_under_the_package():
    from clustermap._pb.clustermap.v1 import registry_pb2, subscription_pb2_grpc

    assert registry_pb2.DESCRIPTOR.package == "clustermap.v1"
    assert hasattr(subscription_pb2_grpc, "SubscriptionStub")


def test_reflection_lists_every_service(server):
    srv = server()
    db = ProtoReflectionDescriptorDatabase(srv.channel())
    services = set(db.get_services())
    assert {
        "clustermap.v1.Registry",
        "clustermap.v1.Subscription",
        "clustermap.v1.Inspection",
        "grpc.health.v1.Health",
    } <= services
    desc = db.FindFileContainingSymbol("clustermap.v1.Subscription")
    assert desc.name == "clustermap/v1/subscription.proto"

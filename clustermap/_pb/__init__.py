"""Generated protobuf/gRPC code. Do not edit: run ``scripts/gen-proto``."""

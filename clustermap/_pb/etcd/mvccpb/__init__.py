"""Generated from proto/etcd/mvccpb/. Do not edit: run ``scripts/gen-proto``."""

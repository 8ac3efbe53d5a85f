"""Generated from proto/etcd/etcdserverpb/. Do not edit: run ``scripts/gen-proto``."""

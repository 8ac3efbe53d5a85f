"""Generated from proto/etcd/ (vendored etcd v3 API). Do not edit: run ``scripts/gen-proto``."""

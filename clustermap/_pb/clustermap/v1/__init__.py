"""Generated from proto/clustermap/v1/. Do not edit: run ``scripts/gen-proto``."""

"""Generated from proto/clustermap/. Do not edit: run ``scripts/gen-proto``."""

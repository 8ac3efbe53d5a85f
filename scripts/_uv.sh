# Sourced by the scripts: finds uv, installing it with pip on a machine that only has Python.
if command -v uv >/dev/null 2>&1; then
  UV=(uv)
else
  python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
  UV=(python3 -m uv)
fi

#!/usr/bin/env bash
# The server's packages that the GPU image lacks (it has anyio, h11, click, httpx, prometheus-client, typing-extensions), as
# Python 3.12 wheels in .gpu/whl, which .gpu/device_env.sh installs on the device. Run once, here:
#   bash scripts/gpu_serve_wheels.sh
set -euo pipefail
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
  typing-inspection==0.4.2 annotated-doc opentelemetry-api==1.45.2
ls .gpu/whl

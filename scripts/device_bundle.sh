#!/usr/bin/env bash
# Packs .device/ (ignored by git) for the lent GPU machine, which has torch and Lightning but neither jsonargparse
# nor CIFAR-10 and reaches no network: the wheels of jsonargparse[signatures] (the versions installed here) and the
# ../shared/data archive with its make_cifar10.py, about 20 MB in all. It then prints the device calls that run
# scripts/gpu_suite.py with them (name .device in the call's carry).
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${1:-../shared/data}
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}  # the one with jsonargparse
[ -f "$shared/make_cifar10.py" ] || { echo "device_bundle.sh: no make_cifar10.py in $shared; fix: pass the folder of the CIFAR-10 archive" >&2; exit 1; }
rm -rf .device && mkdir -p .device/whl .device/data
pins=$("$python" - <<'PY'
from importlib.metadata import version
print(" ".join(f"{n}=={version(n)}" for n in ("jsonargparse", "docstring-parser", "typeshed-client")))
PY
)
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 -d .device/whl $pins
cp "$shared/make_cifar10.py" "$shared/cifar10-jpeg.tar.gz" .device/data/
cat <<'TXT'
.device/ is ready. Call 1 (timeout_s 600, carry [".device"]):

python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/whl/*.whl && export PYTHONPATH=/tmp/site && python3 scripts/gpu_suite.py --data-dir /tmp/data --make-data .device/data/make_cifar10.py --work /tmp/suite

Call 2, at once (the machine stays warm 30 s), on what device time is left (M minutes): the sweep gets the rest and
resumes its runs, on the engine if call 1's engine200 run finished:

export PYTHONPATH=/tmp/site && python3 scripts/gpu_suite.py --steps sweep --data-dir /tmp/data --work /tmp/suite --minutes M

Then copy the sweep's results.csv to docs/sweeps/<date>-<device>.csv: the next lease's suite takes those runs over.
TXT

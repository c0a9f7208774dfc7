#!/usr/bin/env bash
# Device check of --provider cuda (issue 13, item 7): one run on a GPU machine, under 5 minutes.
#
# Run from the repository root:       bash tools/gpu_check.sh          (results: $OUT/gpu_check.json, $OUT/gpu_check.log)
# Without a GPU (checks the CPU parts): GPU_CHECK_SKIP_CUDA=1 bash tools/gpu_check.sh
#
# Wheels expected in .whl/ (cp312, manylinux x86_64; installed with --no-deps into /tmp/site, which PYTHONPATH puts
# before the preinstalled onnxruntime 1.30 CPU package, so the two never share a directory):
#   onnxruntime_gpu-1.31.1   the CUDA 13 build on PyPI: the same CUDA major as torch 2.11+cu130, whose nvidia
#                            packages (nvidia/cu13/lib: cublas, cudart, cufft, curand, nvrtc; nvidia/cudnn/lib:
#                            cuDNN 9) provide the libraries; LD_LIBRARY_PATH below points at them
#   onnx-1.23.2              onnx_easier's dependencies, if the machine lacks them (the script prints what it finds):
#   onnx_graphsurgeon-0.6.1    onnx needs protobuf>=4.25, ml_dtypes, typing_extensions; rich needs markdown-it-py,
#   rich-15.0.0                mdurl, pygments; onnxruntime needs flatbuffers, packaging, protobuf, numpy (all
#   markdown_it_py-4.3.0       present with the preinstalled onnxruntime / torch, except perhaps protobuf, ml_dtypes)
#   mdurl-0.1.2, pygments-2.21.0, ml_dtypes-0.7.0, protobuf-7.36.2 (optional, only if missing there)
# torch (preinstalled) exports the second model; numpy comes with the machine.
# On the nvidia-h200 image (device README, KINDS.md) everything but onnxruntime-gpu and onnx-graphsurgeon is there.
# onnxruntime-gpu's wheel is 255 MB, over the 64 MiB a call carries: split it (`split -b 50M`, see below), carry one
# part per call into /tmp/whlparts on a machine kept warm (`mkdir -p /tmp/whlparts && cp .whlparts/* /tmp/whlparts/`),
# and run this script in the last call: it reassembles the parts.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"

check() {
t0=$(date +%s)
if [ -z "${GPU_CHECK_SKIP_CUDA:-}" ]; then
  # wheels: .whl/*.whl, and wheels split into parts (NAME.whl.part-aa, -ab, ...: `split -b 50M NAME.whl
  # .whlparts/NAME.whl.part-`) found in .whlparts/ or left in /tmp/whlparts by earlier calls on the same warm machine
  mkdir -p /tmp/whl /tmp/whlparts
  cp .whl/*.whl /tmp/whl/ 2>/dev/null
  cp .whlparts/*.part-* /tmp/whlparts/ 2>/dev/null
  for first in /tmp/whlparts/*.part-aa; do
    [ -e "$first" ] || continue
    name=$(basename "$first" .part-aa)
    cat /tmp/whlparts/"$name".part-* > /tmp/whl/"$name"
    echo "reassembled $name from $(ls /tmp/whlparts/"$name".part-* | wc -l) parts: $(sha256sum < /tmp/whl/"$name" | cut -c1-16)"
  done
  ls -la /tmp/whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/whl/*.whl \
    || echo "pip install of the wheels failed"
  export PYTHONPATH=/tmp/site:$PWD
  # CUDA 13 and cuDNN 9 libraries of torch's nvidia packages, for onnxruntime-gpu's CUDA provider
  NVLIB=$(python3 -c "import glob, os, nvidia; print(':'.join(sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, '*', 'lib'))})))" 2>/dev/null)
  export LD_LIBRARY_PATH=${NVLIB}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for lib in libcublasLt.so.13 libcudart.so.13 libcufft.so.12 libcurand.so.10 libcudnn.so.9; do
    found=$(for d in ${NVLIB//:/ }; do ls "$d/$lib" 2>/dev/null; done | head -1)
    echo "  $lib: ${found:-NOT FOUND in the nvidia packages}"
  done
  nvidia-smi -L
  SKIP=""
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  SKIP="--skip-cuda"
fi
export PYTHONUNBUFFERED=1
python3 - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("onnxruntime", "onnx", "onnx_graphsurgeon", "rich", "numpy", "google.protobuf", "ml_dtypes", "torch"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {m.__file__}")
    except Exception as exc:  # report every missing package at once
        print(f"{name} MISSING: {type(exc).__name__}: {exc}")
import onnxruntime as ort
print("available providers:", ort.get_available_providers())
EOF
python3 tools/gpu_check.py --out "$OUT" $SKIP --budget "${GPU_CHECK_BUDGET:-200}"
echo "gpu_check.sh: $(( $(date +%s) - t0 )) s in all"
}

check 2>&1 | tee "$OUT/gpu_check.log"

# Sourced by the GPU scripts: environment, output folder, carried wheels, and `step` (run a
# command, logging it and its output to $OUT/$LOG). Set BUDGET (seconds) before sourcing.
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/bench_out}; DATA=${DATA:-.data/fashion-mnist}; LOG=${LOG:-log.txt}
mkdir -p "$OUT"
# The device machine's image has torch, accelerate and timm but not omegaconf: carry its wheels
# in .whl (BENCHMARKS.md says how).
if ! python3 -c "import omegaconf" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
step() { echo "### [$SECONDS s] $*" | tee -a "$OUT/$LOG"; "$@" 2>&1 | tee -a "$OUT/$LOG"; }

#!/usr/bin/env bash
# The GPU figures of docs/performance.md, on one CUDA device, in one go.
#
#   bash scripts/bench_gpu.sh [OUTPUT_DIR]      (default: bench-gpu/)
#
# Each run writes OUTPUT_DIR/NAME.json (the `harness bench --json-out` figures) and NAME.log (the table). A run
# that fails or passes its time limit (seconds: BENCH_TIMEOUT, default 150 eager and 300 compiled) does not stop
# the others. With PACK=FILE.tgz set, OUTPUT_DIR is packed into it after every run.
# It runs from any directory: OUTPUT_DIR and PACK are taken relative to where it is called, then it works from
# the repository root (the recipes' paths are relative to it). Where the package is not installed, only its
# dependencies are needed (torch and the rest of pyproject.toml's list; `python -m harness` run from the root
# finds harness/ there); to say so explicitly, from the repository root:
#   PYTHONPATH=$PWD bash scripts/bench_gpu.sh OUTPUT_DIR
# An offline GPU machine that has torch, numpy, pandas and rich but not gin-config: fetch its wheel elsewhere
# (`pip download --no-deps -d .whl gin-config==0.5.0`), then there:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:$PWD bash ...
# ONLY='name1 name2' runs just those rows (names below), in the order listed here: the target rows first, so
# that a short lease measures what matters most.
set -u
out=${1:-bench-gpu}
mkdir -p "$out"
out=$(cd "$out" && pwd)  # absolute, before leaving the caller's directory
if [ -n "${PACK:-}" ]; then case "$PACK" in /*) ;; *) PACK="$PWD/$PACK" ;; esac; fi
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
python=${PYTHON:-python3}

bench() {  # bench NAME ARGS...
    local name=$1 limit=150
    shift
    case " ${ONLY:-$name} " in *" $name "*) ;; *) return ;; esac
    case " $* " in *" --compile "*) limit=300 ;; esac
    case " $* " in *" max-autotune "*) limit=900 ;; esac  # autotunes the training graph and the EMA sampler
    echo "=== $name: harness bench $*"
    local start=$SECONDS
    timeout "${BENCH_TIMEOUT:-$limit}" "$python" -m harness bench "$@" --device cuda --json-out "$out/$name.json" \
        >"$out/$name.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - start)) s"
    grep -v "^bench:\|Warning\|warn" "$out/$name.log" | tail -n 25
    if [ -n "${PACK:-}" ]; then tar czf "$PACK" -C "$out" .; fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee "$out/gpu.txt"
"$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

# Target 2 on a GPU (>= 40% of peak bf16): the CelebA-HQ 256 model unmasked (its fine-tuning stage: 768 wide,
# 4097 tokens, the 4-block ViT decoder) in bf16, compiled, with torch's attention kernel and the two fused
# alternatives; then a larger batch and CUDA graphs. The DDIM sampler's images/s (target 4) is in the same rows.
hq=(recipes/celebahq_mask90.gin --stage finetune --steps 10 --warmup 3)
bench hq_b32_compiled "${hq[@]}" --batch-size 32 --compile
bench hq_b32_compiled_cudnn "${hq[@]}" --batch-size 32 --compile --attention cudnn
bench hq_b32_compiled_flash "${hq[@]}" --batch-size 32 --compile --attention flash
bench hq_b64_compiled "${hq[@]}" --batch-size 64 --compile
bench hq_b32_graphs "${hq[@]}" --batch-size 32 --compile reduce-overhead
bench hq_b32_autotune "${hq[@]}" --batch-size 32 --compile max-autotune
# Target 1 on a GPU: the CelebA-64 ablation model, block-4 mask at 90%, batch 256, masked vs unmasked; eager,
# then with CUDA graphs (the masked step is too small to keep the GPU busy op by op).
c64=(recipes/celeba64_mask_ablation.gin --stage pretrain --batch-size 256 --gin 'MASK_RATIO = 0.9' --compare-mask)
bench c64_b256 "${c64[@]}" --steps 10
bench c64_b256_graphs "${c64[@]}" --steps 10 --warmup 3 --compile reduce-overhead
# The masked CelebA-HQ pretraining step against the same step unmasked.
bench hq_mask_b16_graphs recipes/celebahq_mask90.gin --stage pretrain --compare-mask --batch-size 16 --steps 10 \
    --warmup 3 --compile reduce-overhead

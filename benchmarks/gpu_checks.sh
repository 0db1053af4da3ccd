#!/usr/bin/env bash
# One lent GPU, in one call: install autopart (and carried wheels), then every model family's
# training step through cm.distributed() in float32 and bf16 mixed precision against eager on
# the GPU (in parallel), then the one-GPU benchmark. Results land in $OUT.
#
#     OUT=results bash benchmarks/gpu_checks.sh [family|calibrate|bench|recompute|moe|all|compare|compiled|compile-time|predict]
# COMPILE=1 runs the family steps with compiled kernels (Plan.compile_kernels).
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -d .whl ]; then  # packages the GPU image lacks (ortools), carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null
python3 -c "import torch, transformers, ortools; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ortools', ortools.__version__, torch.cuda.get_device_name(0))"
what=${1:-all}

if [ "$what" = family ] || [ "$what" = all ]; then
    # RECOMPUTE=selective|full: every block recomputed that way (checkpointed regions on the GPU)
    pids=()
    for family in gpt2 llama mistral qwen2 bert t5 vit; do
        for precision in ${PRECISIONS:-fp32 bf16}; do
            flag=""; [ "$precision" = bf16 ] && flag="--mixed-precision bf16"
            [ -n "${RECOMPUTE:-}" ] && flag="$flag --recompute $RECOMPUTE"
            [ -n "${COMPILE:-}" ] && flag="$flag --compile-kernels"
            python3 -m torch.distributed.run --standalone --nproc_per_node=1 tests/distributed/family_step.py \
                --family "$family" --stages 1 $flag >"$OUT/family_${family}_${precision}.log" 2>&1 &
            pids+=($!)
        done
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    for log in "$OUT"/family_*.log; do
        line=$(grep -h "^OK rank" "$log" || true)
        echo "$(basename "$log" .log): ${line:-FAILED: $(grep -h -m1 -E 'Error|error' "$log")}"
    done | tee "$OUT/family_summary.txt"
    tar -czf "$OUT/family_logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls family_*.log) && rm -f "$OUT"/family_*.log
fi

if [ "$what" = calibrate ] || [ "$what" = all ]; then
    python3 benchmarks/calibrate_device.py --json "$OUT/cluster_h200.json" 2>&1 | tee "$OUT/calibrate.log" | tail -20
fi

if [ "$what" = bench ] || [ "$what" = all ]; then
    cluster=""; [ -f "$OUT/cluster_h200.json" ] && cluster="--cluster $OUT/cluster_h200.json"
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/single_gpu_step.py $cluster \
        --out "$OUT/single_gpu_step.json" 2>&1 | tee "$OUT/single_gpu_step.log" | grep -v '^{'
fi

if [ "$what" = compiled ]; then  # eager, torch.compile(model), the runner and the compiled runner per family
    cluster=""; [ -f "${CLUSTER:-}" ] && cluster="--cluster $CLUSTER"
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/compiled_step.py $cluster \
        --families "${FAMILIES:-gpt2,llama,mistral,qwen3,gemma2,olmo2,gpt_neox,phi}" ${BENCH_ARGS:-} \
        --out "$OUT/compiled_step${TAG:-}.json" 2>&1 | tee "$OUT/compiled_step${TAG:-}.log" | grep -v '^{'
fi

if [ "$what" = compile-time ] || [ "$what" = all ]; then  # compile time follows distinct blocks, not depth
    python3 benchmarks/compile_time_gpu.py ${COMPILE_TIME_ARGS:-} --out "$OUT/compile_time_gpu${TAG:-}.json" 2>&1 \
        | tee "$OUT/compile_time_gpu${TAG:-}.log"
fi

if [ "$what" = predict ] || [ "$what" = all ]; then  # predicted / measured, preset against calibrated clusters
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/prediction_check.py \
        --out "$OUT/prediction_check${TAG:-}.json" 2>&1 | tee "$OUT/prediction_check${TAG:-}.log" | grep -v '^{'
fi

if [ "$what" = compare ]; then  # one GPU: the comparison script's single-device and autopart modes
    for model in ${MODELS:-small}; do
        python3 benchmarks/gpu_compare.py --model "$model" --nproc 1 --out "$OUT/gpu_compare_${model}_1gpu.json" 2>&1 \
            | tee "$OUT/gpu_compare_${model}_1gpu.log" | tail -15
    done
fi

if [ "$what" = recompute ] || [ "$what" = all ]; then
    python3 benchmarks/recompute_gpu.py --out "$OUT/recompute_gpu.json" 2>&1 | tee "$OUT/recompute_gpu.log" \
        | grep -v -E '^(eager|autopart)_'
fi

if [ "$what" = moe ] || [ "$what" = all ]; then  # a Mixtral-style step: predicted (bf16 experts) against measured
    cluster=""; [ -f "$OUT/cluster_h200.json" ] && cluster="--cluster $OUT/cluster_h200.json"
    python3 -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/moe_step.py $cluster \
        --out "$OUT/moe_step.json" 2>&1 | tee "$OUT/moe_step.log" | grep -v '^{'
fi

#!/usr/bin/env bash
# The ResNet-56 rows of issue 16 that have not been measured yet, one process per row, one at a
# time, most important first. A row whose JSON exists is skipped, so after a kill the script
# resumes at the first unfinished row (the killed row starts over: its stale NAME.json.partial, this
# script's own temporary, is removed first, so only the new run's rows are published).
#
#   bash benchmarks/issue16_rows.sh [--results DIR] WHAT ...   # rows and models under DIR
#                                                   # (default benchmarks/results, where the committed rows are)
#   bash benchmarks/issue16_rows.sh                 # every row, then the latency pass
#   bash benchmarks/issue16_rows.sh accuracy        # accuracy rows only
#   bash benchmarks/issue16_rows.sh latency         # only the latency pass (needs the rows' models)
#   bash benchmarks/issue16_rows.sh seeds50         # 50% MACs: AutoBot (both modes) and torch-pruning, seeds 0-2
#   bash benchmarks/issue16_rows.sh distill-taper   # every method's fine-tune distilled from the dense model
#   bash benchmarks/issue16_rows.sh distill-others  #   (--finetune-distill 0.9, T = 4); two halves, one per core
#   bash benchmarks/issue16_rows.sh distill-autobot # AutoBot with distillation: inner channels at 50%, both at 30%
#   bash benchmarks/issue16_rows.sh distill-hybrid  # the hybrid, AutoBot and FALCON at 20% MACs with distillation
#   bash benchmarks/issue16_rows.sh taper-distill 0 # the taper's own weight training distilled too (seeds given)
#   bash benchmarks/issue16_rows.sh taper-distill-labels 0  # the same, fine-tuned on labels only
#   bash benchmarks/issue16_rows.sh taper-distill-residual 0  # the default taper (residual channels) distilled
#   bash benchmarks/issue16_rows.sh taper50 0       # the taper asked for 50% alone (not a snapshot of a 30% run)
#   bash benchmarks/issue16_rows.sh models50 a|b|c  # session 13's 50% rows again, models kept for eval_jpeg10k.py
#   bash benchmarks/issue16_rows.sh dense 0         # the unpruned model through the same fine-tune (labels, KD)
#
# Run from the repository root, with ../shared/data present. Each row runs at nice 19 on one
# thread (the machine is shared); the latency pass times 1 and 2 threads at batch 1 and 64, so
# run it only when both cores are quiet (check `uptime`) and record the load next to the figures.
# CPU time per row on a free core (estimates from earlier rows): AutoBot ~6-10 min, tp-* ~3-5 min,
# taper (both budgets) ~16 min, falcon and hybrid ~10-15 min (gradients of n rows dominate).
set -euo pipefail
PY=${PY:-/work/venv/bin/python}
DATA=${DATA:-../shared/data}
RES=benchmarks/results
if [[ ${1:-} == --results ]]; then
    RES=${2:?--results needs a folder: pass --results DIR}; shift 2
    mkdir -p "$RES"
fi
[[ -d $RES ]] || { echo "$RES: no such folder; run from the repository root or pass --results DIR" >&2; exit 2; }
MODELS=$RES/structured_models_res
# FALCON's gradient matrix on ResNet-56 is n x 848,944 floats: n = 256 peaks near 1.5 GB
# (bench_scale); n = 500 would come close to the 3 GB a process may use here.
FISHER=${FISHER:-256}
what=${1:-all}

row() {   # row NAME ARGS...: one bench_structured process writing $RES/NAME.json (+ .log)
    local name=$1; shift
    if [[ -f $RES/$name.json ]]; then echo "skip $name (done)"; return; fi
    echo "[$(date -u +%H:%M:%S)] $name: $*"
    rm -f "$RES/$name.json.partial"     # a killed run's temporary: bench_structured would keep it and write beside it
    OMP_NUM_THREADS=1 PYTHONPATH=src nice -n 19 "$PY" benchmarks/bench_structured.py --data-dir "$DATA" \
        --no-latency --models-dir "$MODELS" --out "$RES/$name.json.partial" "$@" > "$RES/$name.log" 2>&1
    mv "$RES/$name.json.partial" "$RES/$name.json"     # only a finished row counts as done
}

if [[ $what == all || $what == accuracy ]]; then
    # 1. 30% MACs: AutoBot (residual channels) and torch-pruning's best criterion in both modes
    row structured_res_autobot_0.3 --methods autobot --budgets 0.3
    row structured_res_tp-magnitude_0.3 --methods tp-magnitude --budgets 0.3
    row structured_res_tp-magnitude-inner_0.3 --methods tp-magnitude-inner --budgets 0.3
    # 2. the annealed taper, one run for both budgets
    row structured_res_taper --methods taper --budgets 0.5 0.3
    # 3. hybrid against pure AutoBot and pure FALCON at 20% and 10% of the MACs
    for b in 0.2 0.1; do
        row structured_res_hybrid_$b --methods hybrid --budgets $b --structured-flops 0.5 --fisher-samples "$FISHER"
        row structured_res_autobot_$b --methods autobot --budgets $b
        row structured_res_falcon_$b --methods falcon --budgets $b --fisher-samples "$FISHER"
    done
    row structured_res_tp-taylor-inner_0.3 --methods tp-taylor-inner --budgets 0.3
    # the 50% models again (the earlier run's models were not kept), for the latency pass
    row structured_res_autobot_0.5_again --methods autobot --budgets 0.5
    row structured_res_tp-magnitude_0.5_again --methods tp-magnitude --budgets 0.5
fi

if [[ $what == seeds50 ]]; then
    # 50% MACs over three seeds (the seed sets the gate training, the fine-tune's order and crops):
    # single rows differ by up to 2 points between reruns, more than the target's +1 margin.
    for s in 0 1 2; do
        MODELS=$RES/structured_models_res_seed$s row structured_res_autobot_0.5_seed$s --methods autobot --budgets 0.5 \
            --seed $s --gate-bn frozen
        MODELS=$RES/structured_models_res_seed$s row structured_res_autobot-inner_0.5_seed$s --methods autobot --budgets 0.5 \
            --seed $s --residual-channels keep --gate-bn frozen
        MODELS=$RES/structured_models_res_seed$s row structured_res_tp-magnitude-inner_0.5_seed$s --methods tp-magnitude-inner --budgets 0.5 --seed $s
        MODELS=$RES/structured_models_res_seed$s row structured_res_tp-taylor-inner_0.5_seed$s --methods tp-taylor-inner --budgets 0.5 --seed $s
    done
    for s in 0 1 2; do    # gates trained with BatchNorm on batch statistics
        MODELS=$RES/structured_models_res_seed$s row structured_res_autobot-bn-batch_0.5_seed$s --methods autobot \
            --budgets 0.5 --seed $s --gate-bn batch
    done
fi

if [[ $what == all || $what == latency ]]; then
    # 4. latency of the residual-channel models at 50% and 30%, 1 and 2 threads, batch 1 and 64
    inputs=()
    for n in autobot_0.5_again tp-magnitude_0.5_again autobot_0.3 tp-magnitude_0.3; do
        [[ -f $RES/structured_res_$n.json ]] && inputs+=("$RES/structured_res_$n.json")
    done
    ((${#inputs[@]})) || { echo "no models to time: run the accuracy rows first" >&2; exit 2; }
    if [[ -e $RES/structured_res_latency.json ]]; then
        echo "$RES/structured_res_latency.json exists: move it away to time the models again" >&2; exit 2
    fi
    echo "[$(date -u +%H:%M:%S)] latency; $(uptime)" | tee "$RES/structured_res_latency.log"
    PYTHONPATH=src nice -n 19 "$PY" benchmarks/bench_structured.py --data-dir "$DATA" --latency-only \
        --inputs "${inputs[@]}" --threads 1 2 --batch-sizes 1 64 --repeats 15 \
        --out "$RES/structured_res_latency.json" 2>&1 | tee -a "$RES/structured_res_latency.log"
    echo "after: $(uptime)" | tee -a "$RES/structured_res_latency.log"
fi

# Distillation in the fine-tune, the same for every method: 0.9 of the loss on the dense model's
# outputs at temperature 4 (the usual CIFAR setting, chosen before any run, not tuned here).
KD=(--finetune-distill 0.9 --finetune-temperature 4)
if [[ $what == distill-taper ]]; then
    for s in 0 1 2; do
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_taper-inner_seed$s --methods taper --budgets 0.5 0.3 \
            --residual-channels keep --seed $s "${KD[@]}"
    done
fi
if [[ $what == taper-distill ]]; then      # seeds as further arguments: one chain per core
    for s in "${@:2}"; do
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_taper-inner+distill_seed$s --methods taper \
            --budgets 0.5 0.3 --residual-channels keep --seed $s --taper-distill 0.9 "${KD[@]}"
    done
fi
if [[ $what == taper-distill-labels ]]; then      # the same taper, fine-tuned on labels only
    for s in "${@:2}"; do
        MODELS=$RES/structured_models_res_seed$s row structured_res_taper-inner+distill_seed$s --methods taper \
            --budgets 0.5 0.3 --residual-channels keep --seed $s --taper-distill 0.9
    done
fi
if [[ $what == taper-distill-residual ]]; then    # the default taper (residual channels), labels-only fine-tune
    for s in "${@:2}"; do
        MODELS=$RES/structured_models_res_seed$s row structured_res_taper+distill_seed$s --methods taper \
            --budgets 0.5 0.3 --seed $s --taper-distill 0.9
    done
fi
if [[ $what == taper50 ]]; then    # what `--flops 0.5` gives a user: the taper planned for 50% only
    for s in "${@:2}"; do
        MODELS=$RES/structured_models_res_alone_seed$s row structured_res_taper-inner-alone_0.5_seed$s --methods taper \
            --budgets 0.5 --residual-channels keep --seed $s
    done
fi
if [[ $what == models50 ]]; then   # three chains (a, b: one per core; c: if time is left)
    for s in 0 1 2; do
        M=$RES/structured_models_res_s16_seed$s
        case $2 in
        a) MODELS=$M row structured_s16_tp-magnitude-inner_0.5_seed$s --methods tp-magnitude-inner --budgets 0.5 --seed $s
           MODELS=$M row structured_s16_taper-inner_seed$s --methods taper --budgets 0.5 0.3 --residual-channels keep \
               --seed $s ;;
        b) MODELS=$M row structured_s16_autobot-inner_0.5_seed$s --methods autobot --budgets 0.5 --seed $s \
               --residual-channels keep --gate-bn frozen
           MODELS=$M row structured_s16_tp-magnitude_0.5_seed$s --methods tp-magnitude --budgets 0.5 --seed $s ;;
        c) MODELS=$M row structured_s16_tp-taylor-inner_0.5_seed$s --methods tp-taylor-inner --budgets 0.5 --seed $s ;;
        esac
    done
fi
if [[ $what == dense ]]; then      # the fine-tune protocol's ceiling: nothing pruned, seeds as arguments
    for s in "${@:2}"; do
        MODELS=$RES/structured_models_dense_seed$s row structured_res_dense_seed$s --methods dense --seed $s
        MODELS=$RES/structured_models_dense_kd_seed$s row structured_kd_dense_seed$s --methods dense --seed $s "${KD[@]}"
    done
fi
if [[ $what == distill-others ]]; then
    for s in 0 1 2; do
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_tp-magnitude-inner_0.5_seed$s --methods tp-magnitude-inner \
            --budgets 0.5 --seed $s "${KD[@]}"
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_tp-taylor-inner_0.5_seed$s --methods tp-taylor-inner \
            --budgets 0.5 --seed $s "${KD[@]}"
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_autobot_0.5_seed$s --methods autobot --budgets 0.5 \
            --seed $s --gate-bn frozen "${KD[@]}"
    done
fi
if [[ $what == distill-autobot ]]; then
    for s in 0 1 2; do
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_autobot-inner_0.5_seed$s --methods autobot --budgets 0.5 \
            --seed $s --gate-bn frozen --residual-channels keep "${KD[@]}"
        MODELS=$RES/structured_models_kd_seed$s row structured_kd_autobot_0.3_seed$s --methods autobot --budgets 0.3 \
            --seed $s --gate-bn frozen "${KD[@]}"
    done
    MODELS=$RES/structured_models_kd_seed0 row structured_kd_tp-magnitude-inner_0.3_seed0 --methods tp-magnitude-inner \
        --budgets 0.3 --seed 0 "${KD[@]}"
fi
if [[ $what == distill-hybrid ]]; then      # each row with and without distillation, same pruning
    H=(--methods hybrid --structured-flops 0.5 --fisher-samples "$FISHER")
    MODELS=$RES/structured_models_kd_seed0 row structured_kd_hybrid_0.2 "${H[@]}" --budgets 0.2 "${KD[@]}"
    MODELS=$RES/structured_models_kd_seed0 row structured_kd_autobot_0.2 --methods autobot --budgets 0.2 \
        --gate-bn frozen "${KD[@]}"
    MODELS=$RES/structured_models_kd_seed0 row structured_kd_falcon_0.2 --methods falcon --budgets 0.2 \
        --fisher-samples "$FISHER" "${KD[@]}"
    MODELS=$RES/structured_models_res_s14 row structured_s14_hybrid_0.2 "${H[@]}" --budgets 0.2
    MODELS=$RES/structured_models_res_s14 row structured_s14_autobot_0.2 --methods autobot --budgets 0.2 --gate-bn frozen
    MODELS=$RES/structured_models_res_s14 row structured_s14_falcon_0.2 --methods falcon --budgets 0.2 \
        --fisher-samples "$FISHER"
    for kd in "" _kd; do
        args=(); [[ -n $kd ]] && args=("${KD[@]}")
        MODELS=$RES/structured_models_res_s14$kd row structured_s14_hybrid${kd}_0.1 "${H[@]}" --budgets 0.1 "${args[@]}"
        MODELS=$RES/structured_models_res_s14$kd row structured_s14_autobot${kd}_0.1 --methods autobot --budgets 0.1 \
            --gate-bn frozen "${args[@]}"
        MODELS=$RES/structured_models_res_s14$kd row structured_s14_hybrid${kd}_0.2_seed1 "${H[@]}" --budgets 0.2 --seed 1 \
            "${args[@]}"
        for s in 1 2; do
            MODELS=$RES/structured_models_res_s14$kd row structured_s14_autobot${kd}_0.2_seed$s --methods autobot \
                --budgets 0.2 --gate-bn frozen --seed $s "${args[@]}"
        done
        MODELS=$RES/structured_models_res_s14$kd row structured_s14_hybrid${kd}_0.1_seed1 "${H[@]}" --budgets 0.1 --seed 1 \
            "${args[@]}"
    done
fi

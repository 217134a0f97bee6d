#!/usr/bin/env bash
# The mutation proof of the emulator's checks: break the real kernels in the ways a GPU punishes
# and show that the check build (DISTILL_EMU_CHECK=all) catches every one of them.
#
# Each mutant is a copy of kernels/ with one change: every __syncthreads() in kernels/ deleted in
# turn (found, not listed, so new barriers are covered without editing this file), plus the
# hand-written mutants below. For each one the kernel units that include the changed file are
# recompiled with exactly the recipe build.rs used (OUT_DIR/emulator_build.sh), linked with the
# unchanged objects into a fast and a check library, and the prebuilt kernel tests (SUITES below;
# the suites of the mutated file first) run against them (DISTILL_EMU_LIBRARY):
#   check    the check build, all three checks; a mutant it misses fails this script;
#   default  the fast build as `cargo test` runs it;
#   seed k   the fast build under schedule seed k = 1..3 (run only while the fast build misses).
# MUTANTS_FAST=0 (what CI sets) builds and runs no fast library: the proof is the check column; the
# fast column, what a run without sanitizers would have seen, is for the README's table.
# MUTANTS_ONE_PART=1 (what CI sets too) leaves the parts that repeat part 0's code for other dtypes
# unmutated in a file the emulator compiles in parts (affected_units below).
# The unmutated sources go through the same path first and must pass everywhere, so a "caught"
# is never an artefact of the rebuild.
#
# Usage: kernels/emulator/mutants.sh [name-filter]   (table on stdout and in target/mutants.md;
# MUTANTS_KEEP=1 keeps each mutant's sources, libraries and test logs and prints where)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
FILTER=${1:-}

# ---- the test binaries and the build's OUT_DIR (the cargo build must be current).
# (fastest first on the check build: tests/kernels.rs takes a minute there, the others seconds)
SUITES=(device_api device_views row_on_chip device_optim device_nn device_blas device_attention device_bf16 device_model topk kernels)
json=$(cargo test --release "${SUITES[@]/#/--test=}" --no-run --message-format=json 2>/dev/null)
OUT_DIR=$(grep '"reason":"build-script-executed"' <<<"$json" | grep 'distill-kernels' |
    sed -E 's/.*"out_dir":"([^"]*)".*/\1/' | tail -1)
exe_of() { grep '"reason":"compiler-artifact"' <<<"$json" | grep "\"name\":\"$1\"" |
    sed -E 's/.*"executable":"([^"]*)".*/\1/' | tail -1; }
declare -A EXE
for suite in "${SUITES[@]}"; do
    exe=$(exe_of "$suite")
    [[ -x $exe ]] || { echo "mutants.sh: cannot find the test binary $suite" >&2; exit 2; }
    EXE[$suite]=$exe
done

# The suites that exercise a kernel file run first for its mutants: run_tests stops at the first
# failing suite, so a caught mutant costs the suites up to the one that catches it rather than
# all of them. A mutant that no suite catches still runs every suite.
first_suites() {
    case $1 in
        attention.cu) echo device_attention device_bf16 device_model ;;
        model_ops.cu) echo device_nn device_bf16 device_model ;;
        optim.cu) echo device_optim ;;
        kd_topk.cu) echo topk ;;
        kd_loss.cu#4) echo row_on_chip ;;
        *.cuh) ;; # every kernel file includes it: the fastest suites first
        *) echo kernels device_api ;;
    esac
}
order_tests() { # file: sets TESTS, every suite once, the file's own first
    local s
    local -A seen=()
    TESTS=()
    for s in $(first_suites "$1") "${SUITES[@]}"; do
        [[ -n ${seen[$s]:-} ]] && continue
        seen[$s]=1
        TESTS+=("${EXE[$s]}")
    done
}
[[ -f $OUT_DIR/emulator_build.sh ]] ||
    { echo "mutants.sh: cannot find the build (OUT_DIR=$OUT_DIR)" >&2; exit 2; }
# shellcheck source=/dev/null
source "$OUT_DIR/emulator_build.sh"
# The one test that builds its own ASan binary takes 20 s and runs no kernel of kernels/; the
# 1,000,003-wide vocabularies take half of tests/kernels.rs on the check build, through the same
# split-row path as split_rows_few_long_rows (which runs 1 x 1,000,003).
TEST_ARGS=(--test-threads 2 --skip address_sanitizer_catches_out_of_bounds_read --skip large_vocabularies)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/distill-mutants.XXXXXX")
if [[ ${MUTANTS_KEEP:-} == 1 ]]; then echo "mutants.sh: keeping $WORK"; else trap 'rm -rf "$WORK"' EXIT; fi

# ---- the mutants: name, file under kernels/, exact text (must occur once), replacement, and
# what it models. Barrier deletions are added below from the sources themselves.
NAMES=() FILES=() FROM=() TO=() WHAT=()
mutant() { NAMES+=("$1"); FILES+=("$2"); FROM+=("$3"); TO+=("$4"); WHAT+=("$5"); }

mutant off-by-one-read common.cuh \
    'for (; j < n; j += nt) f(j,' 'for (; j <= n; j += nt) f(j,' \
    'the row tail visits j = n: reads one element past each row (and writes one past in gradient passes)'
mutant shared-index-off-by-one common.cuh \
    'if (lane == 0) smem[warp] = v;' 'if (lane == 0) smem[warp + 1] = v;' \
    "warp w's partial stored in slot w + 1: slot 0 never written, the last warp's past the used slots"
mutant missing-store kd_loss.cu \
    'if (WRITE) dk_put(g + j, gv[0], acc);' \
    'if (WRITE && j != r.n - 1) dk_put(g + j, gv[0], acc);' \
    "the fused loss never stores the gradient's last element when it falls in a row's scalar tail"
mutant vector-head-ignored kd_loss.cu \
    'return r >= 0 && h % (bytes / static_cast<int>(sizeof(X))) == r;' \
    'return r >= 0;' \
    "the fused loss takes every row start as 16-byte aligned: vector loads at misaligned addresses"
mutant misaligned-vector-load common.cuh \
    'dk_load(const float* p) { return *p; }' \
    'dk_load(const float* p) { const float2 v = *reinterpret_cast<const float2*>(p); return v.x; }' \
    'f32 elements read by 8-byte float2 loads: misaligned at every odd index'
mutant unguarded-global-update hidden_mse.cu \
    'if (threadIdx.x == 0 && valid && p.weight != 0.0f) p.row_loss[row] +=' \
    'if (valid && p.weight != 0.0f) p.row_loss[row] +=' \
    "every thread adds the row's MSE into row_loss, not thread 0 alone"
mutant adamw-contracted optim.cu \
    'const float m = __fadd_rn(__fmul_rn(p.beta1, p.m[i]), __fmul_rn(p.one_minus_beta1, g));' \
    'const float m = p.beta1 * p.m[i] + p.one_minus_beta1 * g;' \
    "AdamW's first moment as a*b + c*d, which the compiler contracts into an FMA: no longer the CPU optimizer's bits"
mutant clip-result-unwritten optim.cu \
    'if (threadIdx.x == 0) {
        const double norm = sqrt(acc);' \
    'if (threadIdx.x == 0 && acc > 1e300) {
        const double norm = sqrt(acc);' \
    "the gradient norm and clipping factor are never written for a finite gradient"
mutant rmsnorm-dw-last-row model_ops.cu \
    'for (int64_t n = 0; n < p.rows; ++n)' \
    'for (int64_t n = 0; n + 1 < p.rows; ++n)' \
    "the RMSNorm weight gradient leaves out the last row"
mutant attention-dkv-diagonal attention.cu \
    'for (int64_t i0 = j; i0 < T; i0 += 32)' \
    'for (int64_t i0 = j + 1; i0 < T; i0 += 32)' \
    "the key/value gradient leaves out each key's own query row (the causal diagonal)"
mutant attention-kv-head-modulo attention.cu \
    'g = h / (NH / NKV);
    float* q = qs[warp];' \
    'g = h % NKV;
    float* q = qs[warp];' \
    "the forward maps query head h to key/value head h mod NKV instead of h / (NH / NKV)"
mutant copy-rows-one-past model_ops.cu \
    'DK_GRID_STRIDE(k, p.rows * p.width)' \
    'DK_GRID_STRIDE(k, p.rows * p.width + 1)' \
    "the strided row copy runs one element past its block: reads past the source and writes past the destination"
mutant bf16-rounded-intermediate model_ops.cu \
    'dk_store(out + i, __fmul_rn(__fmul_rn(g, dk_sigmoid(g)), dk_load(up + i)));' \
    '{ T silu; dk_store(&silu, __fmul_rn(g, dk_sigmoid(g))); dk_store(out + i, __fmul_rn(dk_load(&silu), dk_load(up + i))); }' \
    "SwiGLU rounds silu(gate) to the storage type before the product: invisible in f32, a second rounding in bf16"
mutant topk-tail-counts-top-ids kd_topk.cu \
    'dk_maxsum_add_tail(st, sv, inv_t, dk_topk_find(table, (unsigned)j, mask) >= 0);' \
    'dk_maxsum_add_tail(st, sv, inv_t, dk_topk_find(table, (unsigned)j, mask) > k);' \
    "the top-k loss sums the top ids into the student's tail bucket too"
mutant topk-hash-insert-not-atomic kd_topk.cu \
    'const unsigned old = atomicCAS(&t.key[h], DK_TOPK_EMPTY, id);' \
    'const unsigned old = t.key[h]; if (old == DK_TOPK_EMPTY) t.key[h] = id;' \
    "the shared hash table of top ids is filled by a plain read and write: two threads may claim one slot"
# (FILE#i: a mutant of the code only part i of a file compiled in parts instantiates.)
mutant cluster-stats-unsynced kd_loss.cu#4 \
    'if (threadIdx.x == 0) sh->block_stats = mine;
    cluster.sync();' \
    'if (threadIdx.x == 0) sh->block_stats = mine;' \
    "the row-on-chip loss reads the other blocks' statistics through distributed shared memory with no cluster.sync() after their writes"
mutant cluster-own-statistics kd_loss.cu#4 \
    '&sh->merge_stats);
    DkKdRowConsts kc = dk_kd_row_consts<KIND>(p, st, k);' \
    '&sh->merge_stats);
    DkKdRowConsts kc = dk_kd_row_consts<KIND>(p, mine, k);' \
    "each block of a row-on-chip cluster normalises its slice with its own statistics instead of the row's"
mutant cluster-stash-unwaited kd_loss.cu#4 \
    'dk_cp_async_wait<kDepth - 1>();' \
    'dk_cp_async_wait<kDepth>();' \
    "the row-on-chip pass 1 computes a chunk from shared memory before the asynchronous copy that fills it is waited for"
mutant cluster-mixture-misplaced kd_loss.cu#4 \
    'e.lm = lm[i];' \
    'e.lm = lm[N - 1 - i];' \
    "JSD's pass 3 on chip reads the wrong element's kept log2 mixture"

# Every barrier in the kernel sources (the emulator's self-tests excluded), one mutant each.
while IFS=: read -r file line _; do
    NAMES+=("no-barrier-$(basename "$file" | tr . -)-$line")
    FILES+=("${file#kernels/}") FROM+=("@$line") TO+=("") WHAT+=("$file:$line: barrier deleted")
done < <(grep -n '__syncthreads()\|__syncwarp()' kernels/*.cu kernels/*.cuh | grep -v '^[^:]*:[0-9]*: *//')

# ---- building one mutant's libraries.
# A unit is a kernel file, or part i of one (`kd_loss.0`: build.rs's EMU_PARTS, DK_EMU_PART).
unit_source() { local f=${1%.[0-9]*}; if [[ $f == selftest ]]; then echo emulator/selftest.cu; else echo "$f.cu"; fi; }
unit_defines() { [[ $1 == *.[0-9]* ]] && printf '#define DK_EMU_PART %s\n' "${1##*.}"; return 0; }

# Units whose translation unit includes `file`: the file's own for a .cu, every unit for a header.
# MUTANTS_ONE_PART=1 (CI): of a file compiled in parts, the parts that instantiate the same
# templates as part 0 for other dtypes (kd_loss.cu's mixed pairs, parts 1-3) link unmutated; part 0
# and the parts with code of their own (kd_loss.cu's row-on-chip kernels, part 4) are mutated.
# (The unmutated parts' shared helpers that stay out of line resolve to part 0's mutated copies,
# which the link puts first; nothing of the mutant can be dropped from part 0's own kernels.)
REPEATING_PARTS='^kd_loss\.[123]$'
affected_units() {
    local u
    if [[ $1 == *#* ]]; then
        echo "${1%.cu#*}.${1##*#}"
        return 0
    fi
    for u in "${DK_KERNEL_UNITS[@]}"; do
        [[ ${MUTANTS_ONE_PART:-0} == 1 && $u =~ $REPEATING_PARTS ]] && continue
        case $1 in
            *.cu) [[ $(unit_source "$u") == "$1" || $(unit_source "$u") == "emulator/$1" ]] && echo "$u" ;;
            *) echo "$u" ;;
        esac
    done
    return 0
}

apply_mutation() { # tree file from to
    local path=$1/$2 from=$3 to=$4
    if [[ $from == @* ]]; then
        sed -i -e "${from#@}s/__syncthreads();//" -e "${from#@}s/__syncwarp();//" "$path"
        return
    fi
    local text rest n=0
    text=$(<"$path")
    rest=$text
    while [[ $rest == *"$from"* ]]; do rest=${rest#*"$from"}; n=$((n + 1)); done
    if [[ $n -ne 1 ]]; then
        echo "mutants.sh: the text of a mutant occurs $n times in kernels/$2 (expected once): $from" >&2
        exit 2
    fi
    printf '%s\n' "${text/"$from"/"$to"}" >"$path"
}

compiled() { wait -n || { echo "mutants.sh: a mutant failed to compile" >&2; exit 2; }; }

# The libraries each mutant needs: the check build, and the fast one unless MUTANTS_FAST=0.
FAST=${MUTANTS_FAST:-1}
KINDS=(check)
[[ $FAST == 0 ]] || KINDS+=(fast)

build_libs() { # dir file-or-empty (empty: every unit, unmutated)
    local dir=$1 file=$2 units u jobs=0
    if [[ -n $file ]]; then mapfile -t units < <(affected_units "$file"); else units=("${DK_KERNEL_UNITS[@]}"); fi
    for u in "${units[@]}"; do
        { unit_defines "$u"; printf '#include "%s/kernels/%s"\n' "$dir" "$(unit_source "$u")"; } >"$dir/emu_$u.cpp"
        "$DK_CXX" "${DK_CXXFLAGS[@]}" "${DK_CHECK_KERNEL_FLAGS[@]}" -I "$dir/kernels" \
            -c "$dir/emu_$u.cpp" -o "$dir/emu_$u.check.o" &
        jobs=$((jobs + 1))
        if [[ $FAST != 0 ]]; then
            "$DK_CXX" "${DK_CXXFLAGS[@]}" -I "$dir/kernels" -c "$dir/emu_$u.cpp" -o "$dir/emu_$u.o" &
            jobs=$((jobs + 1))
        fi
        while [[ $jobs -ge $(nproc) ]]; do compiled; jobs=$((jobs - 1)); done
    done
    while [[ $jobs -gt 0 ]]; do compiled; jobs=$((jobs - 1)); done
    local kind suffix objs
    for kind in "${KINDS[@]}"; do
        suffix=$([[ $kind == check ]] && echo .check.o || echo .o)
        objs=()
        for u in "${DK_RUNTIME_UNITS[@]}"; do objs+=("$OUT_DIR/$u$suffix"); done
        for u in "${DK_KERNEL_UNITS[@]}"; do
            if [[ -f $dir/emu_$u$suffix ]]; then objs+=("$dir/emu_$u$suffix"); else objs+=("$OUT_DIR/emu_$u$suffix"); fi
        done
        mkdir -p "$dir/$kind"
        "$DK_CXX" "${DK_LINK_FLAGS[@]}" "${objs[@]}" -o "$dir/$kind/libcuda.so.1"
    done
}

# ---- running the tests against one library: 0 when every test passes, else the failing
# binary's exit status (128 + signal when it crashed).
run_tests() { # log lib env...
    local log=$1 lib=$2 t rc
    shift 2
    : >"$log"
    for t in "${TESTS[@]}"; do
        rc=0
        env DISTILL_EMU_LIBRARY="$lib" "$@" "$t" "${TEST_ARGS[@]}" >>"$log" 2>&1 || rc=$?
        [[ $rc -eq 0 ]] || return "$rc"
    done
}

# What caught it: the distinct kinds of check report outside the self-test kernels (the first
# of each kind, in order), else the failed tests.
verdict() { # log status
    local report failed
    report=$(grep -o 'distill emulator: \(memcheck\|initcheck\|racecheck\): .*' "$1" | grep -v dk_selftest |
        sed -E 's/^distill emulator: //; s/ in kernel .*//; s/ \(never written.*//' |
        awk '{ k = $0; sub(/ (of|at|on) .*/, "", k); gsub(/[0-9]+/, "N", k) } !seen[k]++' | head -3 | paste -sd ';' | sed 's/;/; /g')
    failed=$(grep -c '^test .* FAILED$' "$1" || true)
    if [[ -n $report ]]; then
        echo "$report"
    elif [[ $2 -gt 128 ]]; then
        echo "test process killed by signal $(($2 - 128)) ($(kill -l $(($2 - 128))))"
    else
        echo "$failed tests fail"
    fi
}

TABLE=$ROOT/target/mutants.md
{
    echo "| mutant | what it breaks | check build | fast build |"
    echo "|---|---|---|---|"
} >"$TABLE"
missed=0
for i in -1 "${!NAMES[@]}"; do
    if [[ $i -ge 0 ]]; then name=${NAMES[$i]} file=${FILES[$i]}; else name=baseline file=; fi
    [[ -n $FILTER && $i -ge 0 && $name != *"$FILTER"* ]] && continue
    start=$SECONDS
    dir=$WORK/$name
    mkdir -p "$dir"
    cp -r "$ROOT/kernels" "$dir/kernels"
    [[ -n $file ]] && apply_mutation "$dir/kernels" "${file%#*}" "${FROM[$i]}" "${TO[$i]}"
    build_libs "$dir" "$file"
    order_tests "$file"
    rc=0
    # (the first finding ends a test process: DISTILL_EMU_HALT_ON_ERROR, exit status 66)
    run_tests "$dir/check.log" "$dir/check/libcuda.so.1" DISTILL_EMU_CHECK=all DISTILL_EMU_HALT_ON_ERROR=1 || rc=$?
    check=$([[ $rc -eq 0 ]] && echo missed || verdict "$dir/check.log" "$rc")
    fast="missed (default schedule and seeds 1-3)"
    seeds=(default 1 2 3)
    # MUTANTS_FAST=0 (CI): the proof is the check build's verdict; the fast build's column,
    # which only shows what a test run without sanitizers would have seen, is not computed.
    # The baseline too then: its fast library is not built.
    if [[ $FAST == 0 ]]; then seeds=(); fast="not run (MUTANTS_FAST=0)"; fi
    for seed in "${seeds[@]}"; do
        envs=()
        [[ $seed != default ]] && envs=(DISTILL_EMU_SCHEDULE_SEED=$seed)
        rc=0
        run_tests "$dir/fast.log" "$dir/fast/libcuda.so.1" "${envs[@]}" || rc=$?
        if [[ $rc -ne 0 ]]; then
            fast="$(verdict "$dir/fast.log" "$rc"), $([[ $seed == default ]] && echo "default schedule" ||
                echo "seed $seed (earlier schedules pass)")"
            [[ $i -ge 0 ]] && break
        fi
    done
    secs=$((SECONDS - start))
    if [[ $i -lt 0 ]]; then
        if [[ $check != missed || ($fast != missed* && $fast != not\ run*) ]]; then
            echo "mutants.sh: the unmutated kernels fail when rebuilt here (check: $check, fast: $fast)" >&2
            cat "$dir"/*.log >&2
            exit 2
        fi
        echo "baseline: unmutated kernels rebuilt and passing (${KINDS[*]} build$([[ ${#KINDS[@]} -gt 1 ]] && echo "s, every schedule"); ${secs} s)"
        continue
    fi
    [[ $check == missed ]] && missed=$((missed + 1))
    echo "| $name | ${WHAT[$i]} | $check | $fast |" >>"$TABLE"
    echo "$name (${secs} s): check build: $check; fast build: $fast"
    [[ ${MUTANTS_KEEP:-} == 1 ]] || rm -rf "$dir"
done
echo
cat "$TABLE"
if [[ $missed -gt 0 ]]; then
    echo "mutants.sh: $missed mutant(s) passed the check build" >&2
    exit 1
fi

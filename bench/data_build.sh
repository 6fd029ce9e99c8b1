#!/usr/bin/env bash
# `data build --workers 1`, `--workers 2` and Megatron-LM's tools/preprocess_data.py
# --workers 2 on the same corpus and tokenizer: wall times (one run each after a warm-up),
# cmp of the outputs, and the peak RSS of one huge single-record JSONL.
#
#   bench/data_build.sh CORPUS.jsonl TOKENIZER.model MEGATRON_LM_TREE [HUGE.jsonl]
#
# e.g. with the python3.11-doc corpus (bench/make_rst_corpus.py) and a 4096-piece tokenizer:
#   polycom-megatron data tokenizer corpus.jsonl --output-prefix tok --vocab-size 4096
#   bench/data_build.sh corpus.jsonl tok.model /work/mlm/core_v0.16.1 huge.jsonl
# Environment: PYTHON (default: the python next to polycom-megatron on PATH),
# MLM_PYTHONPATH (Megatron-LM's extra dependencies, default /work/mlm-deps), OUT (default
# a temporary folder).
set -euo pipefail
corpus=$1 tok=$2 tree=$3 huge=${4:-}
exe=$(command -v polycom-megatron)
python=${PYTHON:-$(dirname "$exe")/python}
out=${OUT:-$(mktemp -d)}
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); cores: $(nproc); output in $out"

ours() {  # ours WORKERS PREFIX: the command line
  echo "$exe" data build "$corpus" --tokenizer "$tok" --output-prefix "$2" --workers "$1" \
    --quiet --overwrite
}
theirs=(env "PYTHONPATH=$tree:${MLM_PYTHONPATH:-/work/mlm-deps}" "$python"
  "$tree/tools/preprocess_data.py" --input "$corpus" --output-prefix "$out/mlm"
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$tok" --append-eod --workers 2
  --log-interval 100000000)
timed() {  # timed LABEL COMMAND...: wall seconds, and CPU seconds of all its processes
  /usr/bin/time -f "$(printf '%-28s' "$1") %e s wall, %U s user + %S s sys" "${@:2}" \
    > /dev/null 2> >(grep -v 'Warning\|warnings.warn(' >&2)
}

$(ours 2 "$out/warm") > /dev/null  # warm-up: page cache, imports
timed "data build --workers 1" $(ours 1 "$out/w1")
timed "data build --workers 2" $(ours 2 "$out/w2")
timed "preprocess_data --workers 2" "${theirs[@]}"
for suffix in bin idx; do
  cmp "$out/w1.$suffix" "$out/w2.$suffix" && echo "cmp w1 w2 .$suffix: identical"
  cmp "$out/w1.$suffix" "$out/mlm_text_document.$suffix" && echo "cmp w1 megatron .$suffix: identical"
done
if [ -n "$huge" ]; then
  echo '{"text": "tiny"}' > "$out/tiny.jsonl"  # the floor: Python, megatron.core, the model
  /usr/bin/time -f "tiny record, --workers 1: peak RSS %M KiB" "$exe" data build \
    "$out/tiny.jsonl" --tokenizer "$tok" --output-prefix "$out/tiny" --workers 1 --quiet \
    --overwrite > /dev/null
  for workers in 1 2; do
    /usr/bin/time -f "huge record ($(du -h "$huge" | cut -f1)), --workers $workers: %e s, peak RSS %M KiB (largest process)" \
      "$exe" data build "$huge" --tokenizer "$tok" --output-prefix "$out/huge$workers" \
      --workers "$workers" --quiet --overwrite > /dev/null
  done
fi

#!/usr/bin/env bash
# Prepare the GPU check's carried wheels, here (a machine with pip's index), before the call:
#
#     bash bench/gpu_check_fetch.sh
#
# The GPU machine (Python 3.12, torch and Triton, no network) lacks megatron-core and
# Liger-Kernel. This downloads their wheels for CPython 3.12 on manylinux x86-64 into
# .whl/ (git-ignored; the call carries it), checks their tags and that every requirement
# they declare is on that machine or carried, records the commit under test in
# .whl/COMMIT (the copied tree there has no .git), and checks that what the call sends
# stays under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# megatron-core: the newest release inside compat.py's range (>=0.15,<0.20) with a cp312
# wheel; Liger-Kernel: the PolyNorm and SwiGLU rows bench-kernels compares against.
WHEELS=("megatron-core==${MEGATRON_CORE:-0.19.2}" "liger-kernel==${LIGER_KERNEL:-0.8.5}")
# Requirements those wheels declare that the GPU machine's image already holds.
ON_MACHINE="torch triton numpy packaging"
LIMIT_BYTES=$((64 << 20))

rm -rf .whl && mkdir .whl
for wheel in "${WHEELS[@]}"; do
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$wheel"
done

carried=""
for file in .whl/*.whl; do
  tags=$(unzip -p "$file" '*.dist-info/WHEEL' | sed -n 's/^Tag: //p' | tr '\n' ' ')
  case "$tags" in
    *cp312-cp312-manylinux*x86_64*|*py3-none-any*) ;;
    *) echo "gpu_check_fetch: $file has tags '$tags', not cp312 manylinux x86_64 or pure Python" >&2
       exit 1 ;;
  esac
  name=$(unzip -p "$file" '*.dist-info/METADATA' | sed -n 's/^Name: //p' | head -1)
  carried="$carried $(echo "$name" | tr 'A-Z_' 'a-z-')"
  echo "$(basename "$file"): $(stat -c %s "$file") bytes, tags $tags"
done
for file in .whl/*.whl; do
  # Requirements without an extra marker (those with one are optional).
  unzip -p "$file" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' |
  while read -r requirement; do
    name=$(echo "$requirement" | sed 's/[ ;<>=!~\[(].*//' | tr 'A-Z_' 'a-z-')
    case " $ON_MACHINE $carried " in
      *" $name "*) ;;
      *) echo "gpu_check_fetch: $(basename "$file") needs $requirement, which is neither on the" \
              "GPU machine nor carried: add its wheel to WHEELS" >&2
         exit 1 ;;
    esac
  done
done

commit=$(git rev-parse HEAD)
[ -n "$(git status --porcelain)" ] && commit="$commit dirty"
echo "$commit" > .whl/COMMIT

# What travels: tracked files, untracked ones git does not ignore, and the carried .whl.
sent=$(git ls-files -z --cached --others --exclude-standard |
       xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
wheels=$(du -sb .whl | cut -f1)
total=$((sent + wheels))
echo "travels: working tree $sent + .whl $wheels = $total bytes (limit $LIMIT_BYTES); commit $commit"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
  echo "gpu_check_fetch: $total bytes would travel, over the device tool's 64 MiB" >&2
  exit 1
fi

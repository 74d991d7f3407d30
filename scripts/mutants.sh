#!/usr/bin/env bash
# Mutation testing of the block-group lifecycle's rules (cargo-mutants):
# each mutant of the functions that hold a race rule must make one of the
# race, check or reclaim tests, the deterministic schedules
# (tests/lifecycle_sim.rs, 200 seeds) or the lifecycle's unit tests fail.
# Survivors are listed in target/mutants/mutants.out/missed.txt and must be
# killed by a test or explained in docs/TESTING.md.
#
#   scripts/mutants.sh              # the rule functions: the lifecycle module
#                                   # (the cleaner's rules live there) and the
#                                   # rule sites in scrub, relocation, replace
#   scripts/mutants.sh --whole      # every mutant of block_group.rs and free_space.rs
#   scripts/mutants.sh --list       # list, do not run (extra args go to cargo-mutants)
#
# One mutant at a time, in the `ci` profile, in a copy of the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || cargo install cargo-mutants --locked
rules='may_hand_back|cleaner_verdict|remove_block_group|drop_chunk_map|removable|freeze|ro_hold|scrub_mark|foreign_ro|Drop for|hand_back_locked|writable|BgState::empty|into_relocated|delete_unused_bgs|group_map|scrub_dev_extent|relocate_block_group|wait_for_writers|copy_and_switch|take_over|retired_on|retire'
args=(--file src/engine/block_group.rs)
if [ "${1:-}" = "--whole" ]; then
  shift
  args+=(--file src/engine/free_space.rs)
else
  args+=(--file src/jobs/scrub/scan.rs --file src/jobs/relocation.rs
    --file src/jobs/dev_replace.rs --file src/jobs/devices.rs
    --file src/chunk/volumes.rs --re "$rules")
fi
mkdir -p target/mutants
export CHUNKVOL_SIM_SEEDS=${CHUNKVOL_SIM_SEEDS:-200}
exec cargo mutants "${args[@]}" --profile ci --timeout 300 \
  --output target/mutants "$@" -- \
  --lib --test scrub_races --test check_findings --test reclaim --test replace --test lifecycle_sim

#!/usr/bin/env bash
# Put a race rule's bug back, one at a time, in a scratch worktree, and run
# a test against it: the test must fail. docs/RACES.md ("Reproducing each
# rule's failure") records what each one printed.
#
#   scripts/race-mutations.sh [MUTATION...]      default: all of them
#   TEST=scrub_races scripts/race-mutations.sh seed
#
# TEST is the integration test to run (default lifecycle_sim, the
# deterministic scheduler, with CHUNKVOL_SIM_SEEDS=1000). Exit status 0 when
# every mutation made the test fail.
set -euo pipefail
top=$(git rev-parse --show-toplevel)
test=${TEST:-lifecycle_sim}
wt=${WORKTREE:-/tmp/chunkvol-race-mutations}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/chunkvol-race-mutations-target}
export CHUNKVOL_SIM_SEEDS=${CHUNKVOL_SIM_SEEDS:-1000}

freeze_guard='s/(pub fn freeze<.a>\(self: &Arc<Self>, fs: &.a FsInfo\) -> Option<Freeze<.a>> \{\n        let mut s = self.lock\(\);\n        if )s.removed/${1}false \&\& s.removed/'
map_guard='s/(let Some\(map\) = fs.mapping.get\(bg.start\) else \{\n        if )bg.is_removed\(\)/${1}false \&\& bg.is_removed()/'
r3='s/(s.scrubbing -= 1;\n        )self.bg.hand_back_locked\(self.fs, s\);/${1}drop(s);/'
r4='s/s.map_drop_deferred = s.frozen > 0;\n        s.frozen == 0/s.map_drop_deferred = false;\n        true/'

apply() {
  case $1 in
    guard1) perl -0pi -e "$freeze_guard" src/engine/block_group.rs ;;
    guard2) perl -0pi -e "$map_guard" src/jobs/scrub/scan.rs ;;
    seed) apply guard1; apply guard2 ;;
    r3) perl -0pi -e "$r3" src/engine/block_group.rs ;;
    r4) perl -0pi -e "$r4" src/engine/block_group.rs ;;
    *) echo "unknown mutation $1 (seed guard1 guard2 r3 r4)" >&2; exit 2 ;;
  esac
}

git -C "$top" worktree remove --force "$wt" 2>/dev/null || true
git -C "$top" worktree add --detach "$wt" HEAD >/dev/null
trap 'git -C "$top" worktree remove --force "$wt"' EXIT
cd "$wt"
status=0
for m in "${@:-seed guard1 guard2 r3 r4}"; do
  for one in $m; do
    git checkout -q .
    apply "$one"
    if git diff --quiet; then
      echo "== $one: the edit did not apply (the code moved): update this script" >&2
      exit 2
    fi
    echo "== $one"
    git diff -U0 | grep '^[-+] '
    if cargo test --profile ci --test "$test" -- --test-threads=2 >"/tmp/race-mutation-$one.log" 2>&1; then
      echo "   $test PASSED: nothing caught it"
      status=1
    else
      echo "   $test failed:"
      # The failing seed's message (lifecycle_sim), else the failing tests.
      { grep -E "^seed [0-9]+:" "/tmp/race-mutation-$one.log" || grep -E "^test .* FAILED" "/tmp/race-mutation-$one.log"; } |
        head -4 | cut -c1-240 | sed 's/^/   /'
    fi
  done
done
exit $status

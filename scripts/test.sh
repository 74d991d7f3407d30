#!/usr/bin/env bash
# The whole test suite: installs what the tests need, checks style and the
# function limits (clippy.toml), then runs every test in the `ci` profile:
# release speed with debug assertions and overflow checks on, so a broken
# invariant, a wrapped counter or a lock taken out of order stops the test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --profile ci --all-targets -- -D warnings
cargo build --profile ci --all-targets
cargo test --profile ci -- --test-threads=2

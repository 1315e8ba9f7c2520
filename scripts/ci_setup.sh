#!/usr/bin/env bash
# System packages the test suite needs beyond pip: the OCI registry that tests/test_registry.py pushes to and
# pulls from. Idempotent; .ci/run calls it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/registry.sh install

#!/usr/bin/env bash
# Regenerates the demo output embedded in docs/teaching/README.md, so the walkthrough shows
# what the code really prints. Each block sits between `<!-- demo:NAME -->` and
# `<!-- /demo:NAME -->`; it holds the demo's closing table under QEMU (AMD SVM), with log
# prefixes stripped and cycle counts (which vary from run to run) shown as `<cycles>`.
#   scripts/gen-teaching-docs.sh            rewrite the blocks
#   scripts/gen-teaching-docs.sh --check    exit 1 (showing the diff) when a block has drifted
# Needs the images' ingredients built (scripts/run-qemu.sh --build-only does it).
set -euo pipefail

RZ_PROG=gen-teaching-docs
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
source "$RZ_ROOT/scripts/lib/demo.sh"

check=0
[ "${1:-}" = --check ] && check=1
doc=$RZ_ROOT/docs/teaching/README.md
work=$(mktemp -d "${TMPDIR:-/tmp}/ringzero-docs.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The normalized closing table of one demo run.
demo_block() {
    local name=$1 output=$work/$name.out
    bash "$RZ_ROOT/scripts/run-qemu.sh" --no-build --bios --demo "$name" --timeout 300 > "$output" 2>/dev/null \
        || rz_die "demo $name failed (run scripts/run-qemu.sh --demo $name to see why)"
    # The table is the last block between the two rules the demo prints.
    tr -d '\r' < "$output" \
        | awk '/^======/ { n++; if (n >= 3) { capture = !capture; next } } capture' \
        | sed -E 's/^\[tsc=[ 0-9]+ cpu[0-9]+ [A-Z]+ *\] //' \
        | sed -E '/cycles/ s/ +[0-9]{4,}/ <cycles>/g' \
        | sed -E 's/^(\| (console line|address-space switches|yields|total) \| [0-9]+ \| [0-9]+ \| )[0-9]+ \| [0-9]+ \|$/\1<cycles> | <cycles> |/' \
        | sed -E 's/^(\| (console line|address-space switches|yields|total) \| )[0-9]+ \| [0-9]+ \|$/\1<cycles> | <cycles> |/'
}

cp "$doc" "$work/new.md"
for name in $RZ_DEMOS; do
    demo_block "$name" > "$work/$name.block"
    python3 - "$work/new.md" "$name" "$work/$name.block" <<'PY'
import sys
path, name, block_path = sys.argv[1:4]
text = open(path).read()
start, end = f"<!-- demo:{name} -->", f"<!-- /demo:{name} -->"
if start not in text or end not in text:
    sys.exit(f"docs/teaching/README.md has no {start} ... {end} block")
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
block = open(block_path).read().rstrip("\n")
open(path, "w").write(f"{head}{start}\n```\n{block}\n```\n{end}{tail}")
PY
done

if [ "$check" = 1 ]; then
    if ! diff -u "$doc" "$work/new.md"; then
        rz_say "docs/teaching/README.md has drifted from the demos' output: run scripts/gen-teaching-docs.sh"
        exit 1
    fi
    rz_say "docs/teaching/README.md matches the demos"
else
    cp "$work/new.md" "$doc"
    rz_say "regenerated the demo output in docs/teaching/README.md"
fi

#!/usr/bin/env bash
# The main job on one machine, end to end: create a repository, back up a sample
# directory (twice), list it, restore it, compare, check. Everything lives in ./haul-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
pbs=${HAUL_PBS:-target/release/haul-pbs}
[[ -x $pbs ]] || cargo build --release -p haul-pbs
demo=$PWD/haul-demo
rm -rf "$demo" && mkdir -p "$demo/sample/docs" "$demo/sample/bin"
umask 077
printf 'demo passphrase %s\n' "$RANDOM$RANDOM" >"$demo/passphrase"
export HAUL_REPO=$demo/repo HAUL_PASSWORD_FILE=$demo/passphrase HAUL_CACHE_DIR=$demo/cache
# A sample directory: text, binary, a symlink, an empty file.
for i in $(seq 1 50); do seq 1 $((i * 200)) >"$demo/sample/docs/file$i.txt"; done
head -c 5000000 /dev/urandom >"$demo/sample/bin/random.bin"
ln -s docs/file1.txt "$demo/sample/link"
: >"$demo/sample/empty"

"$pbs" init
"$pbs" backup-local "$demo/sample" --tag demo
"$pbs" backup-local "$demo/sample" --tag demo
"$pbs" snapshots
"$pbs" ls latest "$demo/sample" --no-recursive
"$pbs" restore latest --target "$demo/restored"
diff -r --no-dereference "$demo/sample" "$demo/restored$demo/sample" && echo "restored copy is identical"
"$pbs" check --read-data
echo "the passphrase is in $demo/passphrase: without it the repository cannot be read"

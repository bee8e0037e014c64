#!/usr/bin/env bash
# The main job on one machine, end to end: pull a sample directory through haul-agent
# into the built-in default repository (created on the first run, with a generated key
# file), pull it again (nothing is re-read), list it, restore it through the agent,
# compare, check. Everything lives in ./haul-demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${HAUL_BIN:-target/release}
[[ -x $bin/haul-pbs && -x $bin/haul-agent ]] || cargo build --release -p haul-pbs -p haul-agent
pbs=$bin/haul-pbs
demo=$PWD/haul-demo
rm -rf "$demo" && mkdir -p "$demo/sample/docs" "$demo/sample/bin"
# The default state directory (repository, key file, run records) of this demo.
export HAUL_STATE_DIR=$demo/state HAUL_CACHE_DIR=$demo/cache
unset HAUL_REPO HAUL_PASSWORD HAUL_PASSWORD_FILE
# A sample directory: text, binary, a symlink, an empty file.
for i in $(seq 1 50); do seq 1 $((i * 200)) >"$demo/sample/docs/file$i.txt"; done
head -c 5000000 /dev/urandom >"$demo/sample/bin/random.bin"
ln -s docs/file1.txt "$demo/sample/link"
: >"$demo/sample/empty"

"$pbs" pull --local "$demo/sample" --tag demo
"$pbs" pull --local "$demo/sample" --tag demo
# The other commands find the repository the pulls created, and its key file.
"$pbs" snapshots
"$pbs" ls latest "$demo/sample" --no-recursive
"$pbs" restore latest --via-agent --target "$demo/restored"
diff -r --no-dereference "$demo/sample" "$demo/restored$demo/sample" && echo "restored copy is identical"
"$pbs" check --read-data
"$pbs" runs
echo "run history: $demo/state/runs.jsonl, feed: $demo/state/feed.xml"
echo "the key file $demo/state/repo.key must be kept safe: without it nothing can be restored"

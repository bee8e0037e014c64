#!/usr/bin/env bash
# A real distributed object store on loopback, for the tests and the benchmarks: a Ceph
# cluster of one monitor, three OSDs and a RADOS Gateway (S3), in a directory of its
# own, started as Ceph's vstart.sh starts one for its CI (cephx on, OSDs on memstore,
# pools replicated three times and writable with two).
#
# usage: scripts/ceph-cluster.sh start DIR [OSD_MIB [COPIES]]
#                          (OSD_MIB: memory per OSD, 1024; COPIES: replicas, 3, written with 2)
#        scripts/ceph-cluster.sh stop DIR              (kill -9 of every daemon)
#        scripts/ceph-cluster.sh kill-osd DIR N        (kill -9 of OSD N: a node dies)
#        scripts/ceph-cluster.sh bucket DIR NAME       (a bucket of the S3 user)
#        scripts/ceph-cluster.sh user DIR UID          (another S3 user; prints KEY SECRET)
#
# `start` prints the gateway's endpoint and the S3 user's keys as shell assignments
# (ENDPOINT=..., AWS_ACCESS_KEY_ID=..., AWS_SECRET_ACCESS_KEY=...) and writes them to
# DIR/s3.env. Needs ceph-mon, ceph-osd, radosgw, ceph-common and curl.
set -euo pipefail

cmd=${1:?usage: ceph-cluster.sh start|stop|kill-osd|bucket|user DIR ...}
dir=${2:?a directory}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd -P)
conf=$dir/ceph.conf

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
uuid() { cat /proc/sys/kernel/random/uuid; }
ceph_() { timeout 60 ceph -c "$conf" "$@"; }
# A signed S3 request as the cluster's user (curl does SigV4).
s3() { # METHOD PATH [curl args...]
  local method=$1 path=$2; shift 2
  # shellcheck disable=SC1091
  . "$dir/s3.env"
  curl -s -w '%{http_code}' -X "$method" --aws-sigv4 aws:amz:us-east-1:s3 \
    -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
    --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" "$@" "$ENDPOINT/$path"
}
wait_for() { # WHAT SECONDS CMD...
  local what=$1 limit=$2 t=0; shift 2
  until "$@" >/dev/null 2>&1; do
    ((t++ < limit * 4)) || { echo "ceph-cluster.sh: no $what after ${limit}s (logs in $dir/log)" >&2; exit 1; }
    sleep 0.25
  done
}

case $cmd in
start)
  osd_mib=${3:-1024} copies=${4:-3}
  for t in ceph-mon ceph-osd radosgw ceph ceph-authtool monmaptool curl; do
    command -v "$t" >/dev/null || { echo "ceph-cluster.sh: $t is missing (apt-get install ceph-mon ceph-osd radosgw ceph-common curl)" >&2; exit 2; }
  done
  mkdir -p "$dir"/{mon,osd,run,log,rgw}
  mon_port=$(free_port) rgw_port=$(free_port) fsid=$(uuid)
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:127.0.0.1:$mon_port]
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = true
osd pool default size = $copies
osd pool default min size = $(((copies + 1) / 2))
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = $((osd_mib << 20))
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
mon data = $dir/mon/\$name
osd data = $dir/osd/\$name
keyring = $dir/keyring
ms bind ipv4 = true
ms bind ipv6 = false
mon osd auto mark in = true
osd heartbeat grace = 5
osd heartbeat interval = 1
mon osd down out interval = 0
rgw dns name = localhost
[osd]
keyring = $dir/osd/\$name/keyring
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:$rgw_port
rgw data = $dir/rgw
EOF
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$dir/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
  monmaptool --create --addv a "[v2:127.0.0.1:$mon_port]" --fsid "$fsid" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/keyring"
  ceph-mon -c "$conf" -i a
  for _ in 0 1 2; do
    u=$(uuid)
    id=$(ceph_ osd new "$u")
    mkdir -p "$dir/osd/osd.$id"
    ceph_ auth get-or-create "osd.$id" mon 'allow profile osd' osd 'allow *' mgr 'allow profile osd' \
      >"$dir/osd/osd.$id/keyring"
    ceph-osd -c "$conf" -i "$id" --mkfs --osd-uuid "$u" 2>"$dir/log/osd.$id.mkfs.log"
    ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/osd.$id.mkfs.log"
  done
  ceph_ auth get-or-create client.rgw mon 'allow rw' osd 'allow rwx' >>"$dir/keyring"
  wait_for "3 OSDs up" 60 sh -c "timeout 60 ceph -c '$conf' osd stat | grep -q '3 up'"
  radosgw -c "$conf" -n client.rgw
  key=HAULTESTACCESSKEY secret=haul-$(uuid | cut -c1-8)
  timeout 120 radosgw-admin -c "$conf" -n client.admin user create --uid=haul \
    --display-name=haul --access-key="$key" --secret="$secret" >/dev/null
  printf 'ENDPOINT=http://127.0.0.1:%s\nAWS_ACCESS_KEY_ID=%s\nAWS_SECRET_ACCESS_KEY=%s\n' \
    "$rgw_port" "$key" "$secret" | tee "$dir/s3.env"
  chmod 600 "$dir/s3.env"
  wait_for "gateway" 90 curl -sf -o /dev/null "http://127.0.0.1:$rgw_port"
  ;;
stop)
  for p in "$dir"/run/*.pid; do
    [[ -f $p ]] && kill -9 "$(cat "$p")" 2>/dev/null || true
  done
  ;;
kill-osd)
  n=${3:?an OSD number}
  kill -9 "$(cat "$dir/run/osd.$n.pid")"
  ;;
bucket)
  name=${3:?a bucket name}
  code=$(s3 PUT "$name" -o "$dir/log/bucket.$name.out")
  [[ $code == 200 ]] || { echo "ceph-cluster.sh: bucket $name: HTTP $code $(cat "$dir/log/bucket.$name.out")" >&2; exit 1; }
  ;;
user)
  uid=${3:?a user id}
  key=HAUL${uid^^} secret=$uid-$(uuid | cut -c1-8)
  timeout 120 radosgw-admin -c "$conf" -n client.admin user create --uid="$uid" \
    --display-name="$uid" --access-key="$key" --secret="$secret" >/dev/null
  echo "$key $secret"
  ;;
policy)
  bucket=${3:?a bucket} file=${4:?a policy file}
  code=$(s3 PUT "$bucket?policy=" --data-binary "@$file" -o "$dir/log/policy.$bucket.out")
  [[ $code == 200 || $code == 204 ]] || { echo "ceph-cluster.sh: policy of $bucket: HTTP $code $(cat "$dir/log/policy.$bucket.out")" >&2; exit 1; }
  ;;
*)
  echo "ceph-cluster.sh: unknown command $cmd" >&2; exit 2 ;;
esac

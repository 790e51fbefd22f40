#!/usr/bin/env bash
# `ray up` end to end on this host over SSH to 127.0.0.1 (Ray's local provider): starts an sshd
# if none runs (and stops it after), makes a key, `ray up -y`, deploys deploy/serve.yaml with
# `serve deploy`, asks one question over HTTP, then `ray down -y`. Needs openssh-server and rsync
# (Debian: apt-get install openssh-server rsync). Run from a checkout after deploy/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
KEY=~/.ssh/shardserve_ray_up
CFG=$(mktemp --suffix=.yaml)
STARTED_SSHD=""
for tool in /usr/sbin/sshd rsync; do
  command -v $tool >/dev/null || { echo "need $tool: apt-get install openssh-server rsync" >&2; exit 2; }
done

cleanup() {
  echo "== ray down"
  $RAY down -y "$CFG" || true
  [ -n "$STARTED_SSHD" ] && kill "$STARTED_SSHD" 2>/dev/null || true
  rm -f "$CFG"
}
trap cleanup EXIT

mkdir -p ~/.ssh && chmod 700 ~/.ssh
[ -f "$KEY" ] || ssh-keygen -q -t ed25519 -N "" -f "$KEY" -C shardserve-ray-up
grep -qF "$(cat "$KEY.pub")" ~/.ssh/authorized_keys 2>/dev/null || cat "$KEY.pub" >> ~/.ssh/authorized_keys
chmod 600 ~/.ssh/authorized_keys
if ! ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3 -i "$KEY" "$(whoami)@127.0.0.1" true 2>/dev/null; then
  echo "== starting sshd on 127.0.0.1:22"
  ssh-keygen -A >/dev/null
  mkdir -p /run/sshd
  /usr/sbin/sshd -D -o ListenAddress=127.0.0.1 &
  STARTED_SSHD=$!
  for _ in $(seq 50); do
    ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=3 -i "$KEY" "$(whoami)@127.0.0.1" true 2>/dev/null && break
    sleep 0.2
  done
fi
sed "s/^  ssh_user: .*/  ssh_user: $(whoami)/" deploy/local-cluster.yaml > "$CFG"

echo "== ray up"
$RAY up -y "$CFG"
echo "== serve deploy deploy/serve.yaml"
$RAY exec "$CFG" "cd ~/shardserve && serve deploy deploy/serve.yaml"
echo "== waiting for /healthz"
for _ in $(seq 300); do
  curl -sf http://127.0.0.1:8000/healthz >/dev/null && break
  sleep 2
done
curl -sf http://127.0.0.1:8000/healthz
echo
echo "== shards"
curl -s http://127.0.0.1:8000/v1/shards | .venv/bin/python -c "
import json, sys
b = json.load(sys.stdin)
for s in b['shards']:
    print(f\"  {s['name']}: layers [{s['start']}, {s['end']}), {s['compression']}, node {s['node']} {s['node_id'][:12]}, pid {s['pid']}\")"
echo "== ask"
curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24, "temperature": 0}' |
  .venv/bin/python -c "import json, sys; print(json.load(sys.stdin)['choices'][0]['message']['content'])"
echo "== shardserve stop (the detached shard actors)"
$RAY exec "$CFG" "shardserve stop --address auto"

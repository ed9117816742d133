#!/usr/bin/env bash
# Kisse quick start over REST: two users, one direct conversation, one message,
# read by the second user. Needs only curl and python3 (for JSON parsing).
#
#   BASE_URL=http://localhost:8080 bash examples/quickstart.sh
set -euo pipefail
shopt -s inherit_errexit

BASE_URL="${BASE_URL:-http://localhost:8080}"
BASE_URL="${BASE_URL%/}"
SUFFIX="${RANDOM}$(date +%s)"          # usernames must be unique per server
ALICE="alice_${SUFFIX}"
BOB="bob_${SUFFIX}"
PASSWORD="correct horse battery"

# api METHOD PATH [TOKEN] [JSON_BODY] -> prints the response body; exits on HTTP >= 400
api() {
  local method="$1" path="$2" token="${3:-}" body="${4:-}"
  local args=(-sS --max-time 10 -X "$method" -H 'Content-Type: application/json' -w '\n%{http_code}')
  [[ -n "$token" ]] && args+=(-H "Authorization: Bearer $token")
  [[ -n "$body" ]] && args+=(--data "$body")
  local out status
  if ! out="$(curl "${args[@]}" "$BASE_URL$path")"; then
    echo "FAILED: $method $path: cannot reach $BASE_URL" >&2
    exit 1
  fi
  status="${out##*$'\n'}"
  out="${out%$'\n'*}"
  if (( status >= 400 )); then
    echo "FAILED: $method $path -> HTTP $status: $out" >&2
    exit 1
  fi
  printf '%s' "$out"
}

# json EXPR: read JSON on stdin, print EXPR evaluated with `d` bound to it
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "== 0. server at $BASE_URL"
R=$(api GET /healthz)
echo "$R" | json 'd["status"]'

echo "== 1. register $ALICE and $BOB"
R=$(api POST /api/auth/register "" "{\"username\":\"$ALICE\",\"password\":\"$PASSWORD\"}")
ALICE_TOKEN=$(echo "$R" | json 'd["token"]')
ALICE_ID=$(echo "$R" | json 'd["user"]["id"]')
R=$(api POST /api/auth/register "" "{\"username\":\"$BOB\",\"password\":\"$PASSWORD\"}")
BOB_TOKEN=$(echo "$R" | json 'd["token"]')
BOB_ID=$(echo "$R" | json 'd["user"]["id"]')
echo "alice id=$ALICE_ID"
echo "bob   id=$BOB_ID"

echo "== 2. alice creates a direct conversation with bob"
R=$(api POST /api/conversations "$ALICE_TOKEN" "{\"participant_ids\":[\"$BOB_ID\"]}")
CONV_ID=$(echo "$R" | json 'd["conversation"]["id"]')
echo "conversation id=$CONV_ID kind=$(echo "$R" | json 'd["conversation"]["kind"]')"
# For bob it is a message request until he accepts it (or replies): until then
# alice sees none of his presence, typing or receipts, and cannot call him.
R=$(api POST "/api/conversations/$CONV_ID/accept" "$BOB_TOKEN" "{}")
echo "bob accepts the request: state=$(echo "$R" | json 'd["conversation"]["membership"]["state"]')"

echo "== 3. alice sends a message (ciphertext is base64 of bytes the server never reads)"
CLIENT_ID=$(python3 -c 'import uuid; print(uuid.uuid4())')
CIPHERTEXT=$(printf 'pretend this is encrypted' | python3 -c 'import base64,sys; print(base64.b64encode(sys.stdin.buffer.read()).decode())')
R=$(api POST /api/messages "$ALICE_TOKEN" \
  "{\"conversation_id\":\"$CONV_ID\",\"client_message_id\":\"$CLIENT_ID\",\"ciphertext\":\"$CIPHERTEXT\"}")
MESSAGE_ID=$(echo "$R" | json 'd["message"]["id"]')
echo "message id=$MESSAGE_ID seq=$(echo "$R" | json 'd["message"]["seq"]') client_message_id=$CLIENT_ID"

echo "== 4. bob reads the conversation history"
R=$(api GET "/api/conversations/$CONV_ID/messages" "$BOB_TOKEN")
echo "$R" | json '"\n".join("seq=%d from=%s ciphertext=%s" % (m["seq"], m["sender_id"], m["ciphertext"]) for m in d["messages"])'
GOT=$(echo "$R" | json 'd["messages"][-1]["ciphertext"]')
if [[ "$GOT" != "$CIPHERTEXT" ]]; then
  echo "FAILED: bob got ciphertext $GOT, expected $CIPHERTEXT" >&2
  exit 1
fi

echo "== 5. bob marks the message read"
R=$(api POST "/api/messages/$MESSAGE_ID/read" "$BOB_TOKEN")
echo "$R" | json '"receipt delivered_seq=%d read_seq=%d" % (d["receipt"]["delivered_seq"], d["receipt"]["read_seq"])'

echo "== 6. alice checks the receipts"
R=$(api GET "/api/messages/$MESSAGE_ID/receipts" "$ALICE_TOKEN")
echo "$R" | json '"\n".join("recipient %s delivered=%s read=%s" % (r["user_id"], r["delivered"], r["read"]) for r in d["recipients"])'

echo "OK: $ALICE and $BOB exchanged a message"

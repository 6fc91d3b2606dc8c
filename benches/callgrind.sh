#!/usr/bin/env bash
# Server instructions per delivered message, counted by callgrind: repeatable where timing
# is not (docs/performance.md). The load generator paces `direct` at a low rate (default
# 2,000 msg/s over 64 pairs) against a switchboard running under valgrind; after the
# clients have connected and warmed up, instrumentation is switched on for a window (default
# 4 s) and the count is divided by the `send` frames the server decoded in it (from the
# profile's call counts; every send is delivered once).
#   benches/callgrind.sh                      # acked sends, release build of this checkout
#   benches/callgrind.sh --no-ack             # "ack": false on every send
#   benches/callgrind.sh --bin DIR            # another build: DIR holds switchboard and loadgen
#   benches/callgrind.sh --rate 5000 --window 6
# Prints one line, e.g. `instructions per message: 7794 (683860288 over 87731 sends decoded;
# /metrics counted 86768 deliveries meanwhile; profile DIR/callgrind.out.PID.1)`: the
# profile stays there, for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="" rate=2000 window=4 ack=1
while (($#)); do
  case $1 in
    --bin) bin=$(realpath "$2"); shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    --no-ack) ack=0; shift ;;
    *) echo "usage: $0 [--bin DIR] [--rate MSG_PER_S] [--window SECONDS] [--no-ack]" >&2; exit 2 ;;
  esac
done

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
if ! command -v callgrind_control >/dev/null; then
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends valgrind
fi
if [[ -z $bin ]]; then
  cargo build --release --locked --bins
  bin=$PWD/target/release
fi

# The load generator starts the `switchboard` beside its own executable: a wrapper there
# runs the real one under callgrind, with instrumentation off until the window.
work=$(mktemp -d "${TMPDIR:-/tmp}/switchboard-callgrind.XXXXXX")
cp "$bin/loadgen" "$work/loadgen"
cat >"$work/switchboard" <<EOF
#!/usr/bin/env bash
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out.%p" \
  "$bin/switchboard" "\$@" 2> >(tee -a "$work/server.log" >&2)
EOF
chmod +x "$work/switchboard"

# The `latency` scenario starts one server with acks, then one without: measure the one asked
# for. Its run lasts long enough for the start under valgrind, the warm-up and the window.
"$work/loadgen" latency --peers none --rates "$rate" --duration $((window + 12)) >"$work/loadgen.log" 2>&1 &
loadgen=$!
trap 'kill $loadgen 2>/dev/null || true' EXIT
want=$((2 - ack))
for _ in $(seq 1 240); do
  started=$(grep -c 'switchboard listening' "$work/server.log" 2>/dev/null) || true
  ((${started:-0} >= want)) && break
  sleep 0.5
done
line=$(grep 'switchboard listening' "$work/server.log" | sed -n "${want}p")
[[ -n $line ]] || { echo "$0: the server did not start; see $work" >&2; exit 1; }
http=$(grep -o 'http=[0-9.:]*' <<<"$line" | cut -d= -f2)
pid=$(pgrep -f "callgrind-out-file=$work" | sort -n | tail -1)
delivered() { curl -fsS "http://$http/metrics" | awk '/^switchboard_messages_delivered_total/ { n += $2 } END { print n + 0 }'; }

sleep 8 # the clients connect (slowly, under valgrind) and warm up
# The two readings of the counter fall inside the window, so every message counted was
# handled while instructions were counted (the two /metrics requests are counted too: a
# small, fixed cost, the same for every build).
callgrind_control --instr=on "$pid" >/dev/null 2>&1
before=$(delivered)
sleep "$window"
after=$(delivered)
callgrind_control --dump "$pid" >/dev/null 2>&1
callgrind_control --instr=off "$pid" >/dev/null 2>&1
wait $loadgen || true
trap - EXIT

profile=$(ls "$work/callgrind.out.$pid".* | head -1)
total=$(callgrind_annotate "$profile" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
# The divisor is the number of `send` frames the server decoded while it counted, from the
# profile's own call counts: exact, where the two /metrics readings only bracket the window
# (valgrind switches instrumentation when it next looks: divided by those, one binary gave
# 8,307 and 9,753; per send decoded, 8,234 and 8,254).
# (Run from $work: from inside the checkout callgrind_annotate files some calls under the
# relative source paths and drops their callers.)
sends=$(cd "$work" && callgrind_annotate --tree=caller --threshold=100 --auto=no "$profile" 2>/dev/null |
  awk '/^ *$/ { calls = 0 }
       / < / { for (i = 1; i <= NF; i++) if ($i ~ /^\([0-9,]+x\)$/) { gsub(/[(),x]/, "", $i); calls += $i } }
       / \* .*:switchboard::protocol::frame::decode_client_frame / { n += calls }
       END { print n + 0 }')
((sends > 0)) || { echo "$0: the profile shows no decode_client_frame calls (inlined, or nothing sent); see $work" >&2; exit 1; }
echo "instructions per message: $((total / sends)) ($total over $sends sends decoded; /metrics counted $((after - before)) deliveries meanwhile; profile $profile)"

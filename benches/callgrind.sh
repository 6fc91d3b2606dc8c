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
#   benches/callgrind.sh --nats --rate 20000  # nats-server (.venv, PyPI) under the same load
# With --nats the server counted is nats-server, driven by the same clients at the same rate
# (its clients publish; there is no ack) and the count is divided by the messages it
# published in the window, from its `processInboundClientMsg` calls; switchboard's two runs
# (acked, then not) come first, as the `latency` scenario always runs them, not under
# valgrind. Prints one line, e.g. `instructions per message: 7794 (683860288 over 87731
# sends decoded; /metrics counted 86768 deliveries meanwhile; profile
# DIR/callgrind.out.PID.1)`: the profile stays there, for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="" rate=2000 window=4 ack=1 nats=0
while (($#)); do
  case $1 in
    --bin) bin=$(realpath "$2"); shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --window) window=$2; shift 2 ;;
    --no-ack) ack=0; shift ;;
    --nats) nats=1; shift ;;
    *) echo "usage: $0 [--bin DIR] [--rate MSG_PER_S] [--window SECONDS] [--no-ack] [--nats]" >&2; exit 2 ;;
  esac
done
if ((nats && !ack)); then
  echo "$0: --no-ack is switchboard's; nats-server's clients never ask for acks" >&2
  exit 2
fi

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
if ! command -v callgrind_control >/dev/null; then
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends valgrind
fi
if [[ -z $bin ]]; then
  cargo build --release --locked --bins
  bin=$PWD/target/release
fi

# The load generator starts the `switchboard` beside its own executable (and nats-server from
# $NATS_SERVER): a wrapper runs the real one under callgrind, with instrumentation off until
# the window.
work=$(mktemp -d "${TMPDIR:-/tmp}/switchboard-callgrind.XXXXXX")
cp "$bin/loadgen" "$work/loadgen"
wrap() { # NAME BINARY [VAR=VALUE]: $work/NAME runs BINARY under callgrind
  cat >"$work/$1" <<EOF
#!/usr/bin/env bash
${3:+export $3}
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out.%p" \
  "$2" "\$@" 2> >(tee -a "$work/server.log" >&2)
EOF
  chmod +x "$work/$1"
}
if ((nats)); then
  real=$PWD/.venv/bin/nats-server
  [[ -x $real ]] || { echo "$0: --nats needs .venv/bin/nats-server (benches/run.sh installs it)" >&2; exit 1; }
  # Go preempts goroutines with signals, which callgrind does not survive (an assertion in
  # its signal handling); without them goroutines yield at function calls only.
  wrap nats-server "$real" GODEBUG=asyncpreemptoff=1
  cp "$bin/switchboard" "$work/switchboard"
  peers=nats ready='Server is ready' want=1
  # Every message nats-server takes from a client passes here once.
  counted='github.com/nats-io/nats-server/v2/server.\(\*client\).processInboundClientMsg'
  what="messages published"
else
  wrap switchboard "$bin/switchboard"
  # The `latency` scenario starts one server with acks, then one without: measure the one
  # asked for.
  peers=none ready='switchboard listening' want=$((2 - ack))
  counted='switchboard::protocol::frame::decode_client_frame'
  what="sends decoded"
fi

# The run lasts long enough for the start under valgrind, the warm-up and the window.
NATS_SERVER=$work/nats-server "$work/loadgen" latency --peers "$peers" --rates "$rate" \
  --duration $((window + 12)) >"$work/loadgen.log" 2>&1 &
loadgen=$!
trap 'kill $loadgen 2>/dev/null || true' EXIT
started=0
for _ in $(seq 1 480); do
  started=$(grep -c "$ready" "$work/server.log" 2>/dev/null) || true
  ((${started:-0} >= want)) && break
  sleep 0.5
done
((${started:-0} >= want)) || { echo "$0: the server did not start; see $work" >&2; exit 1; }
pid=$(pgrep -f "callgrind-out-file=$work" | sort -n | tail -1)
delivered() { echo 0; }
if ((!nats)); then
  http=$(grep "$ready" "$work/server.log" | sed -n "${want}p" | grep -o 'http=[0-9.:]*' | cut -d= -f2)
  delivered() { curl -fsS "http://$http/metrics" | awk '/^switchboard_messages_delivered_total/ { n += $2 } END { print n + 0 }'; }
fi

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
# The divisor is the number of messages the server took in while it counted, from the
# profile's own call counts: exact, where the two /metrics readings only bracket the window
# (valgrind switches instrumentation when it next looks: divided by those, one binary gave
# 8,307 and 9,753; per send decoded, 8,234 and 8,254). A Go function that callgrind sees in
# a cycle also shows up as `name'2`: every name is counted.
# (Run from $work: from inside the checkout callgrind_annotate files some calls under the
# relative source paths and drops their callers.)
messages=$(cd "$work" && callgrind_annotate --tree=caller --threshold=100 --auto=no "$profile" 2>/dev/null |
  COUNTED=$counted awk 'BEGIN { fn = ENVIRON["COUNTED"] }
       /^ *$/ { calls = 0 }
       / < / { for (i = 1; i <= NF; i++) if ($i ~ /^\([0-9,]+x\)$/) { gsub(/[(),x]/, "", $i); calls += $i } }
       $0 ~ (" \\* .*:" fn "(\047[0-9]+)? ") { n += calls }
       END { print n + 0 }')
((messages > 0)) || { echo "$0: the profile shows no calls of $counted (inlined, or nothing sent); see $work" >&2; exit 1; }
metrics=""
((nats)) || metrics="; /metrics counted $((after - before)) deliveries meanwhile"
echo "instructions per message: $((total / messages)) ($total over $messages $what$metrics; profile $profile)"

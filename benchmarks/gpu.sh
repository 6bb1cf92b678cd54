#!/usr/bin/env bash
# Every GPU figure of the throughput benchmark in one run, for the offline GPU machine
# (../shared/gpu/README.md: Python 3.12 and CUDA torch there; Ray, diffusers, pydantic and the
# Fashion-MNIST data travel in .gpu/, which git ignores and the device tool carries).
#
# Prepare here, once (66 MB = 63 MiB under .gpu/: the device tool carries 64 MiB in all, so add
# nothing else there):
#   bash ../shared/gpu/pack.sh
#   .venv/bin/python benchmarks/throughput.py --prepare-only --storage .gpu/data --dataset fashion-mnist \
#       --image-size 32 --preset ddpm-cifar10 --trial search_spaces/fashion-mnist.yaml
# (the dataset as Parquet, its FID network, trained here on CPU in about 3 minutes, and the 32 px
# reference statistics: nothing is downloaded or trained on the GPU machine).
#
# Run there, from the repository root, with carry [".gpu"] (pack.sh prints PREFIX, ending in ';'):
#   PREFIX PARTS="packed eager" bash benchmarks/gpu.sh      (then PARTS="fashion compile": each call's
#   estimate 4-6 minutes on one H100, not yet measured: timeout_s=480 each; all parts at once would
#   pass the device tool's 600 s per call)
# Check here on CPU, same code paths at tiny sizes:   SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu.sh
#
# Parts, in order of importance (PARTS="eager fashion compile" picks some, e.g. for a rerun):
#   eager    ddpm-cifar10 UNet (35.7M parameters in the 3-channel CIFAR shape; 1 channel here, as
#            Fashion-MNIST at 32x32), batch 128, bf16: bare loop vs paceray's Ray Train path,
#            2 pairs; the data path alone; MFU
#   packed   benchmarks/packed_throughput.py: 1, 4, 8 and 16 packed arms of the tiny and the
#            ddpm-cifar10 UNet at 32x32, batch 128, bf16, per-arm loop and stacked, against one
#            arm alone; MFU (the packed-arms issue's goal: >= 3x at 8 arms for the small preset)
#   fashion  the two trials of search_spaces/fashion-mnist.yaml (order none, easy-to-hard),
#            shortened, each one real trial through paceray's Ray Train path: FID, eval share,
#            training rate. Not `paceray tune`: it needs MLflow, which that machine lacks (see README)
#   compile  the same as eager with torch.compile in both loops, 1 pair (each loop compiles: the
#            first compile took 76 s there)
# Output: $OUT/gpu-benchmark.json (every figure, one key per part; rewritten after each part so a
# run cut short still returns what it measured) and $OUT/gpu-benchmark.log (the full console).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/runs/gpu-benchmark}
STORAGE=${STORAGE:-$PWD/.gpu/data}
PARTS=${PARTS:-eager packed fashion compile}
SMOKE=${SMOKE:-0}
mkdir -p "$OUT"
parts_dir=$(mktemp -d)
trap 'rm -rf "$parts_dir"' EXIT
exec > >(tee "$OUT/gpu-benchmark.log") 2>&1

if [[ $SMOKE == 1 ]]; then  # CPU, tiny sizes: the same commands, checked in a couple of minutes
  MODEL=(--device cpu --preset tiny --batch 8 --warmup 2 --steps 4)
  EAGER=(--repeats 1) COMPILE=(--repeats 1)
  PACKED=(--device cpu --arms 1,2 --batch 8 --steps 2 --warmup 1 --repeats 1)
  TRIAL=(--trial-set train.steps=20 --trial-set eval.every=10 --trial-set eval.fid_samples=16
         --trial-set eval.sampler_steps=2 --trial-set model.preset=tiny --trial-set train.batch_size=8
         --trial-set resources.gpus_per_worker=0 --trial-set resources.cpus_per_worker=1)
else
  MODEL=(--device cuda --preset ddpm-cifar10 --batch 128 --bf16)
  EAGER=(--warmup 20 --steps 200 --repeats 2)
  COMPILE=(--warmup 10 --steps 200 --repeats 1)  # warm-up starts with the compile itself
  PACKED=(--device cuda --arms 1,4,8,16 --batch 128 --bf16 --steps 30 --warmup 5 --repeats 2)
  TRIAL=(--trial-set train.steps=1000 --trial-set eval.every=500 --trial-set eval.fid_samples=1000
         --trial-set eval.sampler_steps=25)
fi
COMMON=(--dataset fashion-mnist --image-size 32 --storage "$STORAGE")

preflight() {
  "$PY" - "$STORAGE" "$SMOKE" <<'PY' || exit 2
import importlib.util, pathlib, sys
missing = [m for m in ("ray", "ray.train", "diffusers", "pydantic", "yaml", "pyarrow", "torchmetrics", "paceray")
           if importlib.util.find_spec(m.split(".")[0]) is None]
if missing:
    sys.exit(f"gpu.sh: cannot import {', '.join(missing)}: start the command with the prefix that "
             f"../shared/gpu/pack.sh prints, and carry .gpu")
if not (pathlib.Path(sys.argv[1]) / "datasets/fashion-mnist/manifest.json").is_file():
    sys.exit(f"gpu.sh: no Fashion-MNIST under {sys.argv[1]}: prepare it here (see this script's header) and carry .gpu")
import torch
if sys.argv[2] != "1" and not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA device (SMOKE=1 runs the CPU check)")
print(f"gpu.sh: python {sys.version.split()[0]}, torch {torch.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}", flush=True)
PY
}

# Folds every part's JSON into one file: {"eager": {...}, "fashion_none": {...}, ..., "failed": [...]};
# with "summary", also prints the headline figures (the console above them is mostly Ray's).
merge() {
  "$PY" - "$parts_dir" "$OUT/gpu-benchmark.json" "$@" "${failed[@]}" <<'PY'
import json, pathlib, sys
parts = {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("*.json"))}
summary = sys.argv[3:4] == ["summary"]
failed = sys.argv[4 if summary else 3:]
pathlib.Path(sys.argv[2]).write_text(json.dumps({**parts, "failed": failed}, indent=2) + "\n")
for name, part in parts.items() if summary else ():
    if "throughput" in part:
        t = part["throughput"]
        mfu = f", MFU bare {t['mfu_bare']:.1%} ours {t['mfu_ours']:.1%} ({t['peak_assumed']})" if "mfu_ours" in t else ""
        print(f"{name}: bare {t['bare_median']:,.0f} img/s, ours {t['ours_median']:,.0f} img/s, "
              f"ratio {t['ratio']:.3f} (goal {t['ratio_goal']}){mfu}")
    if "medians" in part:  # packed_throughput.py: arm-images/s by path and K
        med = {path: {int(k): v for k, v in by_k.items()} for path, by_k in part["medians"].items()}
        alone = med.get("loop", {}).get(1)
        for path, by_k in med.items():
            print(f"{name} {path}: " + ", ".join(f"K={k} {v:,.0f}" + (f" ({v / alone:.2f}x)" if alone else "")
                                                  for k, v in sorted(by_k.items())) + " arm-img/s")
    if "data_path" in part:
        print(f"{name}: data path {part['data_path']['img_per_s']:,.0f} img/s")
    if "trial" in part:
        r = part["trial"]
        print(f"{name}: FID {r['final_fid']:.2f} after {r['steps']} steps, eval share {r['eval_share']:.1%}, "
              f"training {r['train_img_per_s']:,.0f} img/s, wall {r['wall_seconds']:.0f} s")
PY
}

failed=()
part() {  # part NAME SECONDS ARGS...: one throughput.py (or $SCRIPT) run, its JSON kept as NAME
  local name=$1 limit=$2 script=${SCRIPT:-benchmarks/throughput.py}
  shift 2
  echo "=== $name: $script $* ($(date +%T), limit ${limit}s)"
  local start=$SECONDS
  if ! timeout -k 20 "$limit" "$PY" "$script" "$@" --json "$parts_dir/$name.json"; then
    failed+=("$name")
    echo "=== $name FAILED"
  fi
  echo "=== $name took $((SECONDS - start)) s"
  merge
}

preflight
for p in $PARTS; do
  case $p in
    eager)   part eager 240 "${MODEL[@]}" "${COMMON[@]}" "${EAGER[@]}" --parts throughput,data ;;
    compile) part compile 300 "${MODEL[@]}" "${COMMON[@]}" "${COMPILE[@]}" --compile --parts throughput ;;
    packed)  for preset in tiny ddpm-cifar10; do  # K packed arms, loop and stacked, against one arm
               SCRIPT=benchmarks/packed_throughput.py part "packed_${preset//-/_}" 200 "${PACKED[@]}" \
                 --preset "$preset" --image-size 32
             done ;;
    fashion) for order in none easy-to-hard; do
               part "fashion_${order//-/_}" 150 "${COMMON[@]}" --parts trial \
                 --trial search_spaces/fashion-mnist.yaml "${TRIAL[@]}" --trial-set curriculum.order=$order
             done ;;
    *) echo "gpu.sh: unknown part $p (eager, packed, fashion, compile)"; failed+=("$p") ;;
  esac
done
merge summary
echo "=== wrote $OUT/gpu-benchmark.json; failed parts: ${failed[*]:-none}"
[[ ${#failed[@]} == 0 ]]

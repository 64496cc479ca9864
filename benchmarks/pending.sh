# The GPU measurements that are written but not yet made, in priority order, in one device call
# (the device tool; each part stops by a deadline so the call ends inside its 600 s limit):
#     bash benchmarks/pending.sh            (run from the repository root on the device machine)
# 1. check_kv_rows: the compiled Mosaic prefill kernel reading a slot's row in place (6060b4a) equals it
#    on a sliced copy, and ms of each (a Hopper server's prefill runs this path; never run on a GPU yet).
# 2. serve_latency itl, fused case: #12's 128K prompt beside a chat with a 100 ms budget, now with
#    kv_rows in place and the ~1.5x prefill buckets (768/1536/3072); H100 session 15: 1.229x of alone.
# 3. profile_piece: per-bucket cost of a piece alone / fused / the decode step, and a kernel table.
# Results go into benchmarks/RESULTS.md with date, device, commit and command.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-.}
quiet() { grep -v "^W1\|^I1"; }
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 120 python3 benchmarks/check_kv_rows.py 2>&1 | quiet | tee $OUT/check_kv_rows.log
echo "check_kv_rows rc=$? at $SECONDS s"
timeout 400 python3 benchmarks/serve_latency.py --parts itl --long 131072 --max-itl-ms 100 --itl-fused-only 2>&1 \
    | quiet | tee $OUT/serve_itl.log
echo "serve_latency rc=$? at $SECONDS s"
timeout $((575 - SECONDS)) python3 benchmarks/profile_piece.py --sizes 256,512,768,1024,1536 2>&1 | quiet \
    | tee $OUT/profile_piece.log
echo "profile_piece rc=$? at $SECONDS s"
rm -rf $OUT/profile_piece

"""Speed and memory sweep: ZeRO stage x accumulation x micro batch x checkpointing x latents.

    python benchmarks/sweep.py --arch tiny --zero 2,3,3o --accum 1,2 --micro-batch 4,2 \
        --checkpointing on,off --latents off,on --grid around-base

The same as `defect-ds bench` (see `defect_ds/perf/sweep.py` for what a point is and how it is measured):
every point is its own `deepspeed` training process, and the results go to
benchmarks/results/sweep-{cpu|gpu}-DATE.{md,json,png}.
"""
import sys

from defect_ds.perf.sweep import main

if __name__ == "__main__":
    sys.exit(main(prog="python benchmarks/sweep.py"))

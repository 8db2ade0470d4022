"""``pretune bench``: the benchmarks' command line: ``benchmark.py`` (pretune against a plain loop),
``bench_streaming.py`` (streaming data), ``bench_predict.py`` (predict against evaluation). ``scripts/benchmark.py``
runs it from a checkout. A module of its own, so that the benchmark modules import each other one way only."""

import argparse
import logging
import sys

from pretune.commands import bench_predict, bench_streaming, benchmark


def main() -> None:
    parser = argparse.ArgumentParser(
        description=benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches-per-epoch", type=int, help="fixed-length epochs (default: one pass, 19 batches)")
    parser.add_argument("--tiny", action="store_true", help="1 epoch of 3 steps, 1 repeat, no memory or startup")
    parser.add_argument(
        "--cases", nargs="+", metavar="WORD", help="only the cases whose name contains a word (e.g. MLM)"
    )
    parser.add_argument("--compare", nargs="+", metavar="OVERRIDE", help="pretune vs pretune with these overrides")
    parser.add_argument("--lora", action="store_true", help="only freeze=lora against full fine-tuning")
    parser.add_argument("--loaders", action="store_true", help="the train loader against DataLoader with workers")
    parser.add_argument(
        "--overhead", metavar="CASE", help="where pretune's extra time goes, per step and per epoch, for a case"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: pretune against a tuned hand loop on the GPU (bench_gpu.md; with --tiny: its logic on the CPU)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak for MFU (default: a measured bf16 matmul)")
    parser.add_argument("--memory-child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--loaders-folder",
        nargs="?",
        const="all",
        choices=["throughput", "memory", "accuracy", "mixing", "text", "all"],
        help="streaming data: loader vs training throughput, flat memory, one folder's accuracy in memory / streamed /"
        " from shards, the classes of shards' batches, text shards vs training",
    )
    bench_streaming.add_arguments(parser)
    bench_predict.add_arguments(parser)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    if args.device == "cuda":
        import torch  # benchmark.py has checked it is there

        if not args.tiny and not torch.cuda.is_available():
            sys.exit("error: --device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
        return benchmark.gpu_benchmark(
            args.tiny, repeats=2 if args.repeats == 5 else args.repeats, peak_tflops=args.peak_tflops
        )
    if args.memory_child:
        return benchmark.memory_child(args.memory_child[0], args.memory_child[1], args.memory_child[2:])
    if args.loaders_folder:
        return bench_streaming.run_mode(args.loaders_folder, args)
    if args.predict:
        return bench_predict.run_mode(args)
    if args.loaders:
        print("| loader | s to first batch | batches/s |\n|---|---:|---:|")
        return print("\n".join(f"| {n} | {first:.3f} | {rate:.0f} |" for n, first, rate in benchmark.loader_options()))
    if args.compare:
        return benchmark.compare(args.compare, args.epochs, args.repeats)
    if args.overhead:
        return benchmark.overhead(args.overhead, args.repeats)
    if args.lora:
        return benchmark.lora_benchmark(args.epochs, 1 if args.tiny else 3, 3 if args.tiny else args.batches_per_epoch)
    if args.tiny:
        benchmark.benchmark(
            epochs=1, repeats=1, batches_per_epoch=3, memory=False, with_startup=False, cases=args.cases
        )
    else:
        benchmark.benchmark(args.epochs, args.repeats, args.batches_per_epoch, cases=args.cases)
        if not args.cases:  # make bench: the LoRA table too
            benchmark.lora_benchmark(args.epochs, batches_per_epoch=args.batches_per_epoch)


if __name__ == "__main__":
    main()

"""
Measure training speed, scaling with sequence length, attention-mask cost and sampling speed.

    python bench.py                  # on the machine's accelerator if it has one, else the CPU
    python bench.py --quick=True     # fewer and smaller runs: under 5 minutes on a 2-core CPU
    python bench.py --checkpoint=checkpoints/demo/final.pt   # sampling figures from a trained model

Prints one markdown report. Every time is the median of several runs after a warm-up. FLOP utilization is
achieved model FLOP/s (model.model_flops_per_token, the count train.py logs) divided by the matmul peak
that this script measures on the same machine in the same run. It knows the model, the trainer's
optimizer set-up and the sampler; it writes nothing to disk.
"""

import platform
import statistics
import sys
import time
from dataclasses import dataclass, fields, replace

import torch

from model import (
    BD3LM,
    ModelConfig,
    block_diffusion_block_mask,
    block_diffusion_mask,
    flex_kernel_options,
    model_flops_per_token,
)
from model import train_noise as make_train_noise
from sample import Settings as SampleSettings
from sample import generate, load_model
from train import Hyperparameters, cpu_has_bf16_kernels, make_optimizers

EOT = 50256


@dataclass
class BenchSettings:
    device: str = "auto"  # auto, cpu or cuda
    quick: bool = False  # fewer repeats and shorter sequences
    repeats: int = 5  # timed runs per figure (quick: 3)
    checkpoint: str = ""  # sample from this checkpoint (e.g. the demo's); empty: a demo-size random model


def parse_flags(argv: list[str]) -> BenchSettings:
    settings, kinds = BenchSettings(), {f.name: f.type for f in fields(BenchSettings)}
    for arg in argv:
        name, _, text = arg.removeprefix("--").partition("=")
        if name in ("help", "h"):
            print(__doc__.strip() + "\n\nflags: " + ", ".join(f"--{f.name}={f.default}" for f in fields(settings)))
            sys.exit(0)
        if name not in kinds or not arg.startswith("--") or not text:
            sys.exit(f"error: unknown or empty flag {arg!r}; see --help")
        value = text.lower() in ("true", "1") if kinds[name] is bool else kinds[name](text)
        settings = replace(settings, **{name: value})
    return settings


def median_time(fn, repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def document_stream(length: int, mean_doc: int, generator: torch.Generator) -> torch.Tensor:
    """Random token ids cut by <|endoftext|> into documents of about `mean_doc` tokens (one document when
    mean_doc >= length)."""
    tokens = torch.randint(0, EOT, (length,), generator=generator)
    tokens[torch.rand(length, generator=generator) < 1 / mean_doc] = EOT
    return tokens


# -----------------------------------------------------------------------------
# Measurements


def matmul_peak(device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / median_time(lambda: a @ b, repeats, device)


class TrainStep:
    """One optimizer step of train.py's recipe (forward, backward, Muon + Adam) on a fixed window."""

    def __init__(self, config: ModelConfig, seq_len: int, mean_doc: int, device: torch.device, bf16: bool):
        gen = torch.Generator().manual_seed(0)
        self.model = BD3LM(config).to(device)
        if device.type == "cuda":  # what train.py does on a GPU
            self.model.set_flex_options(flex_kernel_options(torch.cuda.get_device_properties(device)))
            self.model.trunk.compile()
        self.optimizers = make_optimizers(self.model, Hyperparameters(), fast_bf16=bf16)
        self.tokens = document_stream(seq_len, mean_doc, gen).to(device)
        self.noise = make_train_noise(seq_len, config.block_size, 0.3, 0.8, gen)
        self.noise = type(self.noise)(*(x.to(device) for x in self.noise))
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self) -> None:
        with self.autocast:
            loss = self.model(self.tokens, self.noise)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.model.zero_grad(set_to_none=True)


def profile_step(step: TrainStep, top: int = 3) -> list[tuple[str, float]]:
    """The `top` operators by self time in one training step, with their share of the step."""
    step()
    with torch.profiler.profile() as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_device_time_total or e.self_cpu_time_total]
    total = sum(max(e.self_device_time_total, e.self_cpu_time_total) for e in events)
    events.sort(key=lambda e: -max(e.self_device_time_total, e.self_cpu_time_total))
    return [(e.key, max(e.self_device_time_total, e.self_cpu_time_total) / total) for e in events[:top]]


# -----------------------------------------------------------------------------
# Report


def main(argv: list[str]) -> None:
    bench = parse_flags(argv)
    use_cuda = bench.device == "cuda" or (bench.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    repeats = 3 if bench.quick else bench.repeats
    bf16 = use_cuda or cpu_has_bf16_kernels()  # what train.py does with --autocast=auto
    machine = torch.cuda.get_device_name() if use_cuda else f"{platform.processor() or platform.machine()} CPU, " \
        f"{torch.get_num_threads()} threads"
    print(f"# bench.py, {time.strftime('%Y-%m-%d')}\n\nmachine: {machine}; python {platform.python_version()}; "
          f"torch {torch.__version__}; {'quick' if bench.quick else 'full'} run, median of {repeats}\n")

    dtypes = (("fp32", torch.float32), ("bf16", torch.bfloat16)) if bf16 else (("fp32", torch.float32),)
    peaks = {name: matmul_peak(device, dtype, repeats) for name, dtype in dtypes}
    peak = peaks["bf16" if bf16 else "fp32"]
    print("## Matmul peak\n\n| dtype | TFLOP/s |\n|---|---|")
    for name, flops in peaks.items():
        print(f"| {name} | {flops / 1e12:.3f} |")
    if not bf16:
        print("| bf16 | not measured: no bf16 kernels for this CPU (hundreds of times slower than fp32) |")

    demo = ModelConfig(n_layer=4, n_head=4, head_dim=64, model_dim=256, mlp_hidden=1024, attn_backend="auto")
    mid = ModelConfig(n_layer=8, n_head=6, head_dim=64, model_dim=384, mlp_hidden=1536)
    record = ModelConfig()
    train_cases = [("demo", demo, 512), ("mid", mid, 1024)]
    if use_cuda:
        train_cases = [("demo", demo, 4096), ("mid", mid, 16384), ("record", record, 16384)]
    print(f"\n## Training step (forward + backward + Muon/Adam, {'bf16' if bf16 else 'fp32'}, ~1K-token documents)\n")
    print("| config | params | seq_len | step ms | tokens/s | GFLOP/token | FLOP utilization |")
    print("|---|---|---|---|---|---|---|")
    step_seconds = {}
    for name, config, seq_len in train_cases:
        step = TrainStep(config, seq_len, 1000, device, bf16)
        seconds = step_seconds[name] = median_time(step, repeats, device)
        flops = model_flops_per_token(config, seq_len)
        print(f"| {name} | {step.model.num_params() / 1e6:.1f}M | {seq_len} | {seconds * 1e3:.0f} | "
              f"{seq_len / seconds:,.0f} | {flops / 1e9:.3f} | {flops * seq_len / seconds / peak:.1%} |")
    top_costs = profile_step(TrainStep(train_cases[-1][1], train_cases[-1][2], 1000, device, bf16))

    scale_config, base = (record, 8192) if use_cuda else (demo, 256) if bench.quick else (mid, 512)
    print(f"\n## Scaling with sequence length (training step, {scale_config.n_layer}x{scale_config.model_dim} model)\n")
    print("| documents | " + " | ".join(f"{base * k} tokens" for k in (1, 2, 4)) + " | growth 2x | growth 4x |")
    print("|---|---|---|---|---|---|")
    for label, mean_doc in (("~200 tokens", 200), ("one document", 10**9)):
        times = [median_time(TrainStep(scale_config, base * k, mean_doc, device, bf16), repeats, device)
                 for k in (1, 2, 4)]
        print(f"| {label} | " + " | ".join(f"{t * 1e3:.0f} ms" for t in times) +
              f" | {times[1] / times[0]:.2f}x | {times[2] / times[0]:.2f}x |")

    name, config, seq_len = train_cases[-1]
    print(f"\n## Attention mask (block size 16; share of the {name} training step at {seq_len} tokens)\n")
    print("| stream | tokens | tiles computed | BlockMask build ms | dense mask build ms | share of step |")
    print("|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for length in (seq_len, 16384):
        for label, mean_doc in (("~1K-token documents", 1000), ("one document", 10**9)):
            tokens = document_stream(length, mean_doc, gen).to(device)
            block_mask = block_diffusion_block_mask(tokens, 16, EOT)
            tiles = (2 * length // 128) ** 2
            computed = (block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()).item() / tiles
            build = median_time(lambda: block_diffusion_block_mask(tokens, 16, EOT), repeats, device)
            dense = median_time(lambda: block_diffusion_mask(tokens, 16, EOT), repeats, device) \
                if length == seq_len else None  # a dense 32K x 32K mask is what the BlockMask avoids
            share = f"{(build if use_cuda else dense) / step_seconds[name]:.1%}" if length == seq_len else "-"
            print(f"| {label} | {length} | {computed:.2%} | {build * 1e3:.1f} | "
                  f"{'-' if dense is None else f'{dense * 1e3:.1f}'} | {share} |")

    if bench.checkpoint:
        model, _ = load_model(bench.checkpoint, device)
    else:
        torch.manual_seed(0)
        model = BD3LM(demo).to(device).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    print(f"\n## Sampling ({bench.checkpoint or 'demo-size model, random weights'}; one sample, stops at EOT)\n")
    print("| sampler | new tokens | KV cache | tokens/s | forwards per token |\n|---|---|---|---|---|")
    for sampler in ("ddpm", "first_hitting", "confidence"):
        for new_tokens, kv_cache in ((256, True), (256, False), (1024, True), (1024, False)):
            if bench.quick and new_tokens > 256 and not kv_cache:
                continue
            settings = SampleSettings(sampler=sampler, max_new_tokens=new_tokens, kv_cache=kv_cache)
            runs = []

            def run():
                generator = torch.Generator(device=device).manual_seed(0)
                runs.append(generate(model, [], settings, generator)[1])

            # generation has nothing to warm up; the slow reference and quick runs are timed once
            once = bench.quick or not kv_cache
            seconds = median_time(run, 1, device, warmup=False) if once else median_time(run, repeats, device)
            stats = runs[-1]
            print(f"| {sampler} | {stats.new_tokens} | {'yes' if kv_cache else 'no'} | "
                  f"{stats.new_tokens / seconds:,.0f} | {stats.forwards / stats.new_tokens:.2f} |")

    print(f"\n## Largest costs in one training step ({train_cases[-1][0]} config, torch.profiler self time)\n")
    print("| operator | share of step |\n|---|---|")
    for name, share in top_costs:
        print(f"| {name} | {share:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])

"""
Measure training speed, its scaling with sequence length, the attention mask's cost and sampling speed; then print
costmodel.py's estimate of the record run on GPUs (on a GPU, next to the measured record step). One markdown report.

    python tools/bench.py                      # on the machine's accelerator if it has one, else the CPU
    python tools/bench.py --quick=True         # fewer and smaller runs
    python tools/bench.py --checkpoint=checkpoints/demo/final.pt   # sampling figures from a trained model
    python tools/bench.py --estimate_only=True # only the GPU estimates for the record config: times nothing

Times are medians after a warm-up; FLOP utilization is costmodel.model_flops_per_token's FLOP/s over the matmul
peak measured in the run.
"""

import os, platform, sys, time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common
from model import ModelConfig, block_diffusion_block_mask, block_diffusion_mask, setting
from noise import Noise, step_noise
from sample import SAMPLERS, Settings as SampleSettings, generate, load_model
from tools import costmodel as cm
from tools.gpu_check import machine_name, matmul_peak, median_time, random_model
from train import PRESETS, Hyperparameters, build_model, make_optimizers, model_config

@dataclass
class Settings:
    device: str = setting("auto", "auto (cuda if available, else cpu), cpu or cuda")
    quick: bool = setting(False, "fewer repeats and shorter sequences")
    repeats: int = setting(5, "timed runs per figure (quick: 3)")
    checkpoint: str = setting("", "sample from this checkpoint (e.g. the demo's); empty: a demo-size random model")
    estimate_only: bool = setting(False, "print only the GPU estimates for the record config; times nothing")

def preset(name: str) -> Hyperparameters:
    return Hyperparameters(**PRESETS[name])

RECORD = preset("record")
DEMO, MID = model_config(preset("demo")), ModelConfig(n_layer=8, n_head=6, head_dim=64, model_dim=384, mlp_hidden=1536)

def train_step(config: ModelConfig, seq_len: int, mean_doc: int, device: torch.device, bf16: bool, rows: int = 1):
    """(step, model): an optimizer step of train.py's recipe (compiled on a GPU) on `rows` sequences, record noise."""
    gen, model = torch.Generator().manual_seed(0), build_model(config, 0, device)
    if device.type == "cuda":
        model.compile_loss()
    optimizers = make_optimizers(model, RECORD, fast_bf16=bf16)
    tokens = cm.document_stream(rows * seq_len, mean_doc, gen).view(rows, seq_len)
    noise = step_noise(rows * seq_len, config.block_size, RECORD.t_lo, RECORD.t_hi, 0, 0, 0, 1)
    tokens, noise = common.to_device(tokens, Noise(*(x.view(rows, seq_len) for x in noise)), device, config.vocab_size)

    def step() -> None:
        with common.autocast_context(device, bf16):
            loss = model(tokens, noise)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return step, model

def table(title: str, *columns: str) -> None:
    print(f"\n{title}\n\n| {' | '.join(columns)} |\n|{'---|' * len(columns)}")

def row(*cells) -> None:
    print(f"| {' | '.join(map(str, cells))} |")

def matmul_table(device: torch.device, bf16: bool, repeats: int) -> float:
    """The square matmul's FLOP/s per dtype; returns the peak of the dtype training uses."""
    table("## Matmul peak", "dtype", "TFLOP/s")
    for half in (False, True)[:1 + bf16]:
        peak = matmul_peak(device, half, repeats)
        row("bf16" if half else "fp32", f"{peak / 1e12:.3f}")
    if not bf16:
        row("bf16", "not measured: no bf16 kernels for this CPU (hundreds of times slower than fp32)")
    return peak

def train_table(cases, device: torch.device, bf16: bool, repeats: int, peak: float) -> dict[str, float]:
    """Step time, throughput and FLOP utilization of each case (name, config, seq_len, rows); step seconds by name."""
    masked, seconds = cm.training_masked_fraction(RECORD), {}
    table(f"## Training step (forward + backward + Muon/Adam, {'bf16' if bf16 else 'fp32'}, ~{cm.FINEWEB_MEAN_DOC}-"
          f"token documents, {masked:.0%} masked)", "config", "params", "tokens per forward", "step ms", "tokens/s",
          "GFLOP/token", "FLOP utilization")
    for name, config, seq_len, rows in cases:
        step, model = train_step(config, seq_len, cm.FINEWEB_MEAN_DOC, device, bf16, rows)
        seconds[name] = median_time(step, repeats, device)
        flops, tokens = cm.model_flops_per_token(config, seq_len, masked), rows * seq_len
        row(name, f"{model.num_params() / 1e6:.1f}M", f"{rows} x {seq_len}", f"{seconds[name] * 1e3:.0f}",
            f"{tokens / seconds[name]:,.0f}", f"{flops / 1e9:.3f}", f"{flops * tokens / seconds[name] / peak:.1%}")
    return seconds

def scaling_table(config: ModelConfig, base: int, device: torch.device, bf16: bool, repeats: int) -> None:
    """The training step at base, 2 base and 4 base tokens, for short documents and for one document."""
    table(f"## Scaling with sequence length (training step, {config.n_layer}x{config.model_dim} model)",
          "documents", *(f"{base * k} tokens" for k in (1, 2, 4)), "growth 2x", "growth 4x")
    for label, mean_doc in (("~200 tokens", 200), ("one document", 10**9)):
        t = [median_time(train_step(config, base * k, mean_doc, device, bf16)[0], repeats, device) for k in (1, 2, 4)]
        row(label, *(f"{s * 1e3:.0f} ms" for s in t), f"{t[1] / t[0]:.2f}x", f"{t[2] / t[0]:.2f}x")

def mask_table(name: str, seq_len: int, step_seconds: float, device: torch.device, repeats: int) -> None:
    """BlockMask and dense mask build times, as a share of the `name` step at seq_len (GPU: BlockMask; CPU: dense)."""
    size = RECORD.block_size
    table(f"## Attention mask (block size {size}; share of the {name} training step at {seq_len} tokens)", "stream",
          "tokens", "tiles computed", "BlockMask build ms", "dense mask build ms", "share of step")
    gen = torch.Generator().manual_seed(1)
    for length in (seq_len, 16384):
        for label, mean_doc in (("~1K-token documents", 1000), ("one document", 10**9)):
            tokens = cm.document_stream(length, mean_doc, gen).to(device)
            build = median_time(lambda: block_diffusion_block_mask(tokens, size, cm.EOT), repeats, device)
            dense = median_time(lambda: block_diffusion_mask(tokens, size, cm.EOT), repeats, device) \
                if length == seq_len else None  # a dense 32K x 32K mask is what the BlockMask avoids
            share = f"{(build if device.type == 'cuda' else dense) / step_seconds:.1%}" if dense is not None else "-"
            row(label, length, f"{cm.tile_fraction(tokens, size):.2%}", f"{build * 1e3:.1f}",
                "-" if dense is None else f"{dense * 1e3:.1f}", share)

def sampling_table(checkpoint: str, quick: bool, device: torch.device, repeats: int) -> None:
    """Each sampler's tokens/s and forwards per token, cached or not; uncached and quick runs timed once, no warm-up."""
    model = load_model(checkpoint, device)[0] if checkpoint else random_model(DEMO, device).eval()
    table(f"## Sampling ({checkpoint or 'demo-size model, random weights'}; one sample, stops at EOT)", "sampler",
          "new tokens", "KV cache", "tokens/s", "forwards per token")
    for sampler in SAMPLERS:
        for new_tokens, kv_cache in ((256, True), (256, False), (1024, True), (1024, False))[:4 - quick]:
            settings, runs = SampleSettings(sampler=sampler, max_new_tokens=new_tokens, kv_cache=kv_cache,
                                            num_samples=1, min_new_tokens=0), []

            def run() -> None:
                runs.append(generate(model, [], settings, torch.Generator(device=device).manual_seed(0))[1])
            once = quick or not kv_cache
            seconds = median_time(run, 1 if once else repeats, device, warmup=not once)
            row(sampler, runs[-1].new_tokens, "yes" if kv_cache else "no", f"{runs[-1].new_tokens / seconds:,.0f}",
                f"{runs[-1].forwards / runs[-1].new_tokens:.2f}")

def profile_table(name: str, step, top: int = 3) -> None:
    """The `top` operators by self time (torch.profiler) in one training step, after a warm-up step."""
    step()
    with torch.profiler.profile() as prof:
        step()
    cost = {e.key: max(e.self_device_time_total, e.self_cpu_time_total) for e in prof.key_averages()}
    table(f"## Largest costs in one training step ({name} config, torch.profiler self time)", "operator",
          "share of step")
    for key in sorted(cost, key=cost.get, reverse=True)[:top]:
        row(key, f"{cost[key] / sum(cost.values()):.1%}")

def estimate_tables() -> None:
    """Per GPU under its preset: each part of a step, the step, minutes and peak memory; then memory by part, preset."""
    config, tiles = model_config(RECORD), cm.fineweb_tile_fraction(RECORD.seq_len, RECORD.block_size)
    params = cm.numel(p for group in cm.parameter_groups(config).values() for p in group)
    e = cm.EFFICIENCY
    print(f"\n## Estimates for the record config (est.: computed from FLOPs and bytes, not measured)\n\n"
          f"{params / 1e6:.1f}M parameters; {RECORD.steps} steps of {RECORD.batch_size} sequences x {RECORD.seq_len} "
          f"tokens; block {RECORD.block_size}. The recipe of train.py: {cm.RECIPE}. Datasheet peaks times assumed "
          f"efficiencies (matmul {e['matmul']:.0%}, attention {e['attention']:.0%}, memory {e['memory']:.0%}; "
          f"{cm.EAGER_OP_SECONDS * 1e6:.0f} us an eager op). The BlockMask computes {tiles:.1%} of the attention tiles "
          f"of {RECORD.seq_len}-token streams of ~{cm.FINEWEB_MEAN_DOC}-token documents (counted here, 16 streams).")
    memory = {}
    for gpu in cm.GPUS:
        run = preset(gpu.preset)
        sequences = run.batch_size // gpu.count
        memory[gpu.preset] = cm.peak_memory(config, run.micro_batch * run.seq_len)
        parts, forwards = cm.step_parts(config, run.seq_len, sequences, gpu.count, tiles), sequences // run.micro_batch
        table(f"### {gpu.count}x {gpu.name}, --preset={gpu.preset}: per GPU and step {forwards} forward"
              f"{'s' * (forwards > 1)} of {run.micro_batch} x {run.seq_len} tokens", "part of one step",
              "work per GPU", "est. ms")
        for part, work in parts.items():
            row(part, work, f"{1e3 * work.seconds(gpu):.1f}")
        step_ms = 1e3 * sum(work.seconds(gpu) for work in parts.values())
        row("**step**", "", f"**{step_ms:.0f}**")
        row(f"**record, minutes** ({run.steps} steps)", "", f"**{run.steps * step_ms / 60e3:.1f}**")
        row(f"**peak memory per GPU, GiB** (of {gpu.memory / 2**30:.0f})", "",
            f"**{sum(memory[gpu.preset].values()) / 2**30:.1f}**")
    table("### Peak memory per GPU by preset (est.: costmodel.peak_memory)", "part",
          *(f"--preset={name}: {preset(name).micro_batch} x {preset(name).seq_len} tokens per forward, est. GiB"
            for name in memory))
    for part in memory["record"]:
        row(part, *(f"{parts[part] / 2**30:.2f}" for parts in memory.values()))
    row("**total**", *(f"**{sum(parts.values()) / 2**30:.1f}**" for parts in memory.values()))

def report(bench: Settings, device: torch.device) -> None:
    """Every measured table, then the estimates; on a GPU, last, the measured record step next to its estimate."""
    repeats, bf16, cuda = 3 if bench.quick else bench.repeats, common.fast_bf16(device), device.type == "cuda"
    machine = machine_name(device)
    print(f"# bench.py, {time.strftime('%Y-%m-%d')}\n\nmachine: {machine}; python {platform.python_version()}; "
          f"torch {torch.__version__}; {'quick' if bench.quick else 'full'} run, median of {repeats}")
    peak = matmul_table(device, bf16, repeats)
    gpu = cm.gpu_spec(machine) if cuda else None
    rows = preset(gpu.preset).micro_batch if gpu else 1  # the record forward of this GPU's preset
    cases = [("demo", DEMO, 4096, 1), ("mid", MID, 16384, 1), ("record", model_config(RECORD), RECORD.seq_len, rows)] \
        if cuda else [("demo", DEMO, 512, 1), ("mid", MID, 1024, 1)]
    step_seconds = train_table(cases, device, bf16, repeats, peak)
    scaling_table(*((model_config(RECORD), 8192) if cuda else (DEMO, 256) if bench.quick else (MID, 512)), device,
                  bf16, repeats)
    name, config, seq_len, rows = cases[-1]  # on a GPU the record config
    mask_table(name, seq_len, step_seconds[name], device, repeats)
    sampling_table(bench.checkpoint, bench.quick, device, repeats)
    profile_table(name, train_step(config, seq_len, cm.FINEWEB_MEAN_DOC, device, bf16, rows)[0])
    estimate_tables()
    if cuda:
        parts = cm.step_parts(config, seq_len, rows, 1, cm.fineweb_tile_fraction(seq_len, config.block_size))
        table(f"## Measured and estimated (record config on this GPU: one forward of {rows} x {seq_len} tokens, "
              "one optimizer step)", "GPU", "measured ms", "est. ms")
        row(machine, f"{1e3 * step_seconds['record']:.0f}",
            f"{1e3 * sum(w.seconds(gpu) for w in parts.values()):.0f}" if gpu else "no estimate for this GPU")

def main(argv: list[str]) -> None:
    bench = common.command_line(argv, Settings, "python tools/bench.py [--name=value ...]", f"\n\n{__doc__.strip()}")
    with common.user_errors():
        if bench.repeats < 1:
            raise common.ConfigError(f"--repeats must be at least 1, got {bench.repeats}")
        device = common.pick_device(bench.device)
    if bench.estimate_only:
        print(f"# bench.py --estimate_only=True, {time.strftime('%Y-%m-%d')}")
        estimate_tables()
    else:
        report(bench, device)

if __name__ == "__main__":
    main(sys.argv[1:])

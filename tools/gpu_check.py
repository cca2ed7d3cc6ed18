"""
The prepared GPU check, `python3 tools/gpu_check.py --report=gpu_check.md`: what a first GPU window must show in 8
minutes, offline. Five parts (PARTS), each run even if one before failed, each printed (and appended to --report) as
it ends; then one `gpu_check:` verdict line, and exit status 0 only if every part passed. DEADLINE_SECONDS stops the
check, compiles included: a part it interrupts or never reaches is `skipped (time)`; without data record_step and
validation are `skipped (no data)`. Without CUDA it is a rehearsal on the CPU (a tiny config, aot_eager, flex's CPU
guard lifted), so every line of it has run before a GPU is paid for.
"""

import contextlib, glob, io, math, os, platform, re, signal, statistics, subprocess, sys, tempfile, time, traceback
from unittest import mock
from dataclasses import asdict, dataclass, replace
from importlib import metadata

import torch
import torch.nn.attention.flex_attention as flex_attention_module
from torch._dynamo.utils import counters

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import common
import eval as evaluate
import train
from data.loader import DEMO_DIR, TokenLoader, find_shards, val_batches
from data.tokenizer import get_tokenizer
from model import BD3LM, flex_kernel_options, setting
from noise import Noise, eval_noise, step_noise
from sample import Settings as SampleSettings, cache_append, cache_logits, generate, new_cache
from tools import costmodel as cm
from tools.demo_corpus import prepare_demo

RECORD_STEPS, RECORD_SECONDS = 30, 240  # record_step's cap on a GPU, compile included
# 8 minutes of a GPU less python's start and imports; record_step leaves the last two parts RESERVE_SECONDS
DEADLINE_SECONDS, RESERVE_SECONDS = 440, 90
# the H200 is not in costmodel.GPUS: the H100 SXM's compute with its own memory (datasheet)
H200 = cm.GPUS[0]._replace(name="H200", match="H200", memory_bandwidth=4.8e12, memory=141 * 10**9, count=1)
TINY = dict(n_layer=2, n_head=2, head_dim=32, model_dim=64, mlp_hidden=128, seq_len=256, micro_batch=2)

def flex_backward_on_cpu():
    """Lift FlexAttention's private refusal of a CPU backward (a GPU's compiled graph on a CPU): never for training."""
    return mock.patch.object(flex_attention_module, "_validate_device", lambda *tensors: None)

def machine_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"

@dataclass
class Target:
    """Where the check runs and what: on a GPU the preset and Inductor, on a CPU (a rehearsal) a tiny config."""
    device: torch.device
    hp: train.Hyperparameters  # one forward a step: batch_size = micro_batch
    deadline: float  # time.perf_counter() at which the check stops
    missing: str  # why there is no training data, in one line; empty: there is

    rehearsal = property(lambda self: self.device.type != "cuda")
    backend = property(lambda self: "aot_eager" if self.rehearsal else "inductor")

def target_for(device: torch.device, deadline: float) -> Target:
    cuda = device.type == "cuda"
    preset = "record" if cuda and torch.cuda.get_device_properties(device).total_memory >= 70 * 2**30 \
        else "record_24gb"
    overrides = {} if cuda else dict(TINY, preset="demo")
    hp = train.Hyperparameters(**{**train.PRESETS[preset], "preset": preset, **overrides})
    try:
        files, missing = data_files(hp), ""
    except Exception as error:  # no corpus and no way to build one here: the parts without data still run
        files, missing = {}, f"no training data: {type(error).__name__}: {str(error).splitlines()[0]}"
    hp = replace(hp, batch_size=hp.micro_batch, **files)
    train.check_settings(hp, world_size=1)
    return Target(device, hp, deadline, missing)

def data_files(hp: train.Hyperparameters) -> dict:
    """FineWeb-Edu if its shards are here, else the demo corpus, carried or built (which needs the GPT-2 vocabulary)."""
    if hp.preset != "demo" and os.path.isfile(hp.val_file) and glob.glob(hp.train_files):
        return {}
    if not os.path.isfile(f"{DEMO_DIR}/demo_val_000000.bin"):
        get_tokenizer()  # offline without the vocabulary this fails at once, before the corpus's text is collected
    with contextlib.redirect_stdout(io.StringIO()):  # its size line is not part of the report
        prepare_demo()
    return dict(data=f"{DEMO_DIR}/demo")

def needs_data(target: Target) -> None:
    if target.missing:
        raise Skipped("it needs training data: see `missing` at the top")

def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

def environment(target: Target, state: dict) -> list[str]:
    allocator = common.allocator_settings()
    try:
        triton = f"- triton {metadata.version('triton')}"
    except metadata.PackageNotFoundError:
        triton = "- triton: not installed" + ("" if target.rehearsal else " (Inductor needs it on a GPU)")
    lines = [f"- device: {machine_name(target.device)}", f"- python {platform.python_version()}, torch "
             f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}", triton,
             f"- allocator: {allocator or 'default'}", *(f"- limitation: {x}" for x in common.torch_limitations())]
    if not target.rehearsal:
        props = torch.cuda.get_device_properties(target.device)
        lines += [f"- driver {driver_version()}, compute capability {props.major}.{props.minor}, "
                  f"{props.total_memory / 2**30:.1f} GiB, {getattr(props, 'shared_memory_per_block_optin', 0):,} "
                  "bytes of shared memory a block",
                  f"- flex kernel options: {flex_kernel_options(props) or 'the defaults'}"]
        if "expandable_segments:True" not in allocator:
            raise RuntimeError(f"the allocator runs without expandable segments: {allocator or 'default'}")
    lines.append(f"- preset {target.hp.preset}: {target.hp.micro_batch} x {target.hp.seq_len} tokens per forward, "
                 f"data {'none' if target.missing else target.hp.train_files}")
    return lines

def driver_version() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"

def random_model(config, device: torch.device) -> BD3LM:
    """Every weight random with unit-scale outputs: the zero-initialized head and projections make most gradients 0."""
    torch.manual_seed(0)
    model = BD3LM(config).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, p.size(-1) ** -0.5 if p.dim() > 1 else 0.1)
    return model

def loss_and_grads(model: BD3LM, tokens, noise, bf16: bool) -> torch.Tensor:
    """The loss and every gradient, flattened into one fp32 vector (the loss first)."""
    with common.autocast_context(tokens.device, bf16):
        loss = model(tokens, noise)
    loss.backward()
    flat = torch.cat([loss.detach().float()[None], *(p.grad.float().flatten() for p in model.parameters())])
    model.zero_grad(set_to_none=True)
    return flat

def flex_equals_sdpa(target: Target, state: dict) -> list[str]:
    """Compiled flex against eager SDPA on one row of seq_len, both in bf16, each against SDPA in fp32."""
    hp, device = target.hp, target.device
    config = replace(train.model_config(hp), n_layer=2)
    sdpa, flex = random_model(config, device), random_model(config, device)
    if device.type == "cuda":
        flex.set_flex_options(flex_kernel_options(torch.cuda.get_device_properties(device)))
    flex.compile_loss(target.backend, flex=True)
    tokens = cm.document_stream(hp.seq_len, cm.FINEWEB_MEAN_DOC, torch.Generator().manual_seed(1))[None]
    noise = step_noise(hp.seq_len, config.block_size, hp.t_lo, hp.t_hi, 1, 0, 0, 1)
    tokens, noise = common.to_device(tokens, Noise(*(x[None] for x in noise)), device, config.vocab_size)
    started = time.perf_counter()
    flex_bf16 = loss_and_grads(flex, tokens, noise, bf16=True)
    common.synchronize(device)
    compile_seconds = time.perf_counter() - started
    reference, sdpa_bf16 = (loss_and_grads(sdpa, tokens, noise, bf16) for bf16 in (False, True))

    def error(x: torch.Tensor) -> tuple[float, float]:
        return (float((x[0] - reference[0]).abs() / reference[0].abs()),
                float((x[1:] - reference[1:]).norm() / reference[1:].norm()))
    (flex_loss, flex_grads), (sdpa_loss, sdpa_grads) = error(flex_bf16), error(sdpa_bf16)
    lines = [f"- {config.n_layer} layers of the record's shapes, 1 x {hp.seq_len} tokens, bf16; first call "
             f"(compile) {compile_seconds:.1f} s", "", "| relative error against SDPA in fp32 | loss | gradients |",
             "|---|---|---|", f"| flex, compiled, bf16 | {flex_loss:.2e} | {flex_grads:.2e} |",
             f"| SDPA, eager, bf16 | {sdpa_loss:.2e} | {sdpa_grads:.2e} |"]
    if not (flex_loss <= 2 * sdpa_loss + 1e-3 and flex_grads <= 2 * sdpa_grads + 1e-3):
        raise RuntimeError("flex in bf16 is further from fp32 than twice SDPA in bf16:\n" + "\n".join(lines))
    return lines

def record_step(target: Target, state: dict) -> list[str]:
    """The training graph of train.py's warm-up, then Run.train_step with its optimizers, one forward a step."""
    needs_data(target)
    hp, device = target.hp, target.device
    reset_peak_memory(device)
    counters.clear()
    model = state["model"] = train.build_model(train.model_config(hp), hp.seed, device)
    model.compile_loss(target.backend, flex=True)
    bf16 = common.fast_bf16(device)
    autocast = common.autocast_context(device, bf16)
    loader = TokenLoader(find_shards(hp.train_files), hp.seq_len, sequences=hp.micro_batch)
    run = train.Run(hp, 0, 1, device, autocast, model, train.make_optimizers(model, hp, bf16), loader,
                    log=lambda line, console=True: None, checkpoint_folder=state["folder"])
    compile_ms = warm_up_training(model, hp, autocast, device)
    steps, cap = (8, RECORD_SECONDS / 2) if target.rehearsal else (RECORD_STEPS, RECORD_SECONDS)
    losses, seconds, started = [], [], time.perf_counter()
    for step in range(steps):
        out_of_data = loader.position + 2 * hp.micro_batch * hp.seq_len > loader.num_tokens  # the demo corpus is small
        out_of_time = step >= 3 and (time.perf_counter() - started > cap - compile_ms / 1000
                                     or time.perf_counter() > target.deadline - RESERVE_SECONDS)
        if out_of_data or out_of_time:
            break
        step_start = run.sync_time()
        try:
            losses.append(run.train_step(step))
        except SystemExit:
            raise RuntimeError(f"train_step stopped at step {step + 1} (its error is on stderr)") from None
        seconds.append(run.sync_time() - step_start)
    step_s, tokens = statistics.median(seconds[2:] or seconds), hp.micro_batch * hp.seq_len  # 2: optimizer states
    flops = cm.model_flops_per_token(model.config, hp.seq_len, cm.training_masked_fraction(hp))
    peak, half = matmul_peak(device, bf16), max(1, len(losses) // 3)
    first, last = statistics.fmean(losses[:half]), statistics.fmean(losses[-half:])
    def figures(step_s: float, peak: float, peak_text: str, memory_gib: float) -> list[str]:
        return [f"{1e3 * step_s:.1f} ms", f"{tokens / step_s:,.0f}", peak_text, f"{flops * tokens / step_s / peak:.1%}",
                f"{memory_gib:.2f} GiB"]
    measured = figures(step_s, peak, f"{peak / 1e12:.1f} (measured)", common.peak_memory_mib(device) / 1024)
    name, estimated = machine_name(device), ["-"] * 5
    gpu = cm.GPUS[0] if target.rehearsal else cm.gpu_spec(name) or (H200 if "H200" in name else None)
    if gpu:  # the H100's figures in a rehearsal, so that the estimate's code runs too
        tiles = cm.fineweb_tile_fraction(hp.seq_len, model.config.block_size)
        parts = cm.step_parts(model.config, hp.seq_len, hp.micro_batch, 1, tiles)
        estimated = figures(sum(w.seconds(gpu) for w in parts.values()), gpu.bf16_flops, f"{gpu.bf16_flops / 1e12:.0f} "
                            "(datasheet)", sum(cm.peak_memory(model.config, tokens).values()) / 2**30)
    rows = ("step", "tokens/s", "matmul peak, TFLOP/s", "model FLOP utilization, of the matmul peak", "peak memory")
    lines = [f"- {model.num_params() / 1e6:.1f}M parameters, {hp.micro_batch} x {hp.seq_len} tokens a step, "
             f"{len(losses)} steps, {counters['stats']['unique_graphs']} compiled graphs", "",
             f"| figure | measured | {f'est. {gpu.name}' if gpu else 'no estimate for this GPU'} |", "|---|---|---|",
             f"| compile (train.warm_up's training graph) | {compile_ms / 1000:.1f} s | 60-180 s |",
             *(f"| {row} | {m} | {e} |" for row, m, e in zip(rows, measured, estimated)),
             f"| train loss, first and last {half} steps | {first:.3f} -> {last:.3f} | falling |"]
    if len(losses) < 2 or not all(map(math.isfinite, losses)) or not last < first:
        raise RuntimeError("the train loss did not fall:\n" + "\n".join(lines))
    return lines

def warm_up_training(model: BD3LM, hp: train.Hyperparameters, autocast, device: torch.device) -> float:
    """train.warm_up's training graph only (the check never runs the val graph compiled); returns its ms."""
    started = time.perf_counter()
    _, tokens = next(val_batches(hp.val_file, hp.seq_len, hp.seq_len))
    noise = eval_noise(hp.seq_len, model.config.block_size, common.VAL_NOISE_SEED, 0)
    tokens, noise = common.to_device(tokens, noise, device, model.config.vocab_size)
    with autocast:  # repeat, not expand: the compiled graph is specialized to the strides of real batches too
        model(tokens.repeat(hp.micro_batch, 1), Noise(*(x.repeat(hp.micro_batch, 1) for x in noise))).backward()
    model.zero_grad(set_to_none=True)
    common.synchronize(device)
    return 1000 * (time.perf_counter() - started)

def median_time(fn, repeats: int, device: torch.device, warmup: bool = True) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    if warmup:
        fn()
    seconds = []
    for _ in range(repeats):
        common.synchronize(device)
        started = time.perf_counter()
        fn()
        common.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)

def matmul_peak(device: torch.device, bf16: bool, repeats: int = 5) -> float:
    """FLOP/s of a square matmul in bf16 or fp32."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16 if bf16 else torch.float32) for _ in range(2))
    return 2 * n**3 / median_time(lambda: a @ b, repeats, device)

def validation(target: Target, state: dict) -> list[str]:
    """eval.main on a checkpoint of the record step's model (else a random one), 4 val chunks, eager as eval.py runs."""
    needs_data(target)
    hp, model = target.hp, state.get("model") or random_model(train.model_config(target.hp), target.device)
    path = os.path.join(state["folder"], "gpu_check.pt")
    common.save_checkpoint(path, model, asdict(hp))
    reset_peak_memory(target.device)
    output, started = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(output):
        evaluate.main([f"--checkpoint={path}", f"--files={hp.val_file}", f"--val_tokens={4 * hp.seq_len}",
                       f"--device={target.device.type}"])
    result = output.getvalue().strip().splitlines()[-1]
    nelbo = float(re.search(r"val_nelbo:(\S+)", result).group(1))
    if not math.isfinite(nelbo):
        raise RuntimeError(f"val NELBO is {nelbo}")
    gib = common.peak_memory_mib(target.device) / 1024
    return [f"- `{result}`", f"- {time.perf_counter() - started:.1f} s, peak memory {gib:.2f} GiB (the eager pass "
            "takes SDPA: flex runs only compiled)"]

def sampling(target: Target, state: dict) -> list[str]:
    """Cached generation speed; then one noisy block's cached logits against model.logits over its context."""
    device = target.device
    model = (state.get("model") or random_model(train.model_config(target.hp), device)).eval()
    new_tokens, block = 256 if device.type == "cuda" else 64, model.config.block_size
    lines = ["| samples | new tokens | tokens/s | forwards per token |", "|---|---|---|---|"]
    for samples in (1, 8):
        settings = SampleSettings(sampler="ddpm", max_new_tokens=new_tokens, stop_at_eot=False, num_samples=samples)
        tokens, stats = generate(model, [], settings, torch.Generator(device=device).manual_seed(0))
        lines.append(f"| {samples} | {stats.new_tokens} | {samples * stats.new_tokens / stats.seconds:,.0f} | "
                     f"{stats.forwards / stats.new_tokens:.2f} |")
    context = tokens[:, : new_tokens - block]
    noisy = torch.where(torch.rand(tokens.size(0), block, device=device) < 0.5, model.config.mask_id,
                        tokens[:, context.size(1):])
    with torch.no_grad():
        cache = new_cache(model, tokens.size(0), new_tokens)
        cache_append(model, cache, context)
        history = torch.cat([context, noisy], 1)
        difference = float((cache_logits(model, cache, noisy) - model.logits(history, history)[:, context.size(1):])
                           .abs().max())
    lines += ["", f"- cached against recomputed logits of a noisy block after {context.size(1)} tokens, 8 samples: "
              f"max difference {difference:.1e}"]
    if not difference < 1e-3:
        raise RuntimeError(f"cached logits differ from a recompute by {difference}")
    return lines

PARTS = {"environment": environment, "flex_equals_sdpa": flex_equals_sdpa, "record_step": record_step,
         "validation": validation, "sampling": sampling}

class Skipped(Exception):
    """A part that cannot run here, for want of something the report names in one line (no data)."""

class OutOfTime(BaseException):
    """The check's deadline, raised inside a running part; a BaseException, so no `except Exception` takes it."""

@dataclass
class Settings:
    device: str = setting("auto", "auto (cuda if available, else a rehearsal on the CPU), cpu or cuda")
    report: str = setting("", "also write each part's section to this file as the part ends")

def main(argv: list[str]) -> None:
    s = common.command_line(argv, Settings, "python3 tools/gpu_check.py [--report=gpu_check.md]")
    with common.user_errors():
        if s.report and not os.path.isdir(os.path.dirname(os.path.abspath(s.report))):
            raise common.ConfigError(f"--report={s.report}: its folder does not exist")
    sys.exit(check(s.device, s.report))  # the check picks the device itself, so that its failure is in the report

def check(device_name: str, report_path: str) -> int:
    """Every part under the deadline, each reported as it ends, the summary line last; 0 only if every part passed."""
    started, results, target, rehearsal = time.perf_counter(), {}, None, False
    if report_path:
        open(report_path, "w").close()

    def report(text: str) -> None:  # printed and appended as it comes, so a killed run leaves its finished parts
        print(text, flush=True)
        if report_path:
            with open(report_path, "a") as f:
                f.write(text + "\n")
    with tempfile.TemporaryDirectory() as folder, contextlib.ExitStack() as stack:
        try:
            with alarm_at(started + DEADLINE_SECONDS):
                device = common.pick_device(device_name)
                rehearsal = device.type != "cuda"
                report(f"# gpu_check on {machine_name(device)}, {time.strftime('%Y-%m-%d %H:%M')}" if not rehearsal
                       else "# gpu_check REHEARSAL on the CPU (no CUDA device): a tiny config, aot_eager, FlexAttention"
                       f"'s CPU guard lifted; no figure here is a GPU's. {time.strftime('%Y-%m-%d %H:%M')}")
                if rehearsal:
                    stack.enter_context(flex_backward_on_cpu())
                target = target_for(device, started + DEADLINE_SECONDS)
            if target.missing:
                report(f"- missing: {target.missing}; README's GPU section says what to bring")
        except Exception as error:  # no part can run; the summary line still comes
            report(f"- setup failed: {type(error).__name__}: {error}")
            results["setup"] = "failed"
        except OutOfTime:
            report(f"- setup stopped at the check's deadline, {DEADLINE_SECONDS} s after its start")
            results["setup"] = "skipped(time)"
        state = {"folder": folder}
        for name, part in PARTS.items() if target else ():
            results[name] = run_part(name, part, target, state, report)
            if results[name] != "skipped(time)":  # a compile stopped midway is left as it is
                torch._dynamo.reset()
    ok, failed = (sum(v.startswith(verdict) for v in results.values()) for verdict in ("ok", "failed"))
    skipped = len(results) - ok - failed
    word = "FAIL" if failed else "INCOMPLETE" if skipped else "PASS"
    report(f"\ngpu_check: {word} {ok}/{len(results)} passed{f', {skipped} skipped' if skipped else ''}"
           f"{' (rehearsal on CPU)' if rehearsal else ''}: {' '.join(f'{k}:{v}' for k, v in results.items())} "
           f"seconds:{time.perf_counter() - started:.0f}")
    return 0 if word == "PASS" else 1

def run_part(name: str, part, target: Target, state: dict, report) -> str:
    """One part, its section reported as it ends; its verdict for the summary line."""
    part_start = time.perf_counter()
    if part_start > target.deadline:
        report(f"\n## {name}: skipped (time), 0 s\n\n- not started: the check's {DEADLINE_SECONDS} s had passed")
        return "skipped(time)"
    try:
        with alarm_at(target.deadline):
            lines = part(target, state)
        verdict, heading = "ok", "passed"
    except Skipped as reason:
        lines, verdict, heading = [f"- {reason}"], "skipped(no data)", "skipped (no data)"
    except OutOfTime:
        lines, verdict, heading = [f"- stopped at the check's deadline, {DEADLINE_SECONDS} s after its start"], \
            "skipped(time)", "skipped (time)"
    except (Exception, SystemExit) as error:  # reported; the next part runs
        lines, verdict = [f"```\n{traceback.format_exc(limit=-3).rstrip()}\n```"], "failed"
        heading = f"FAILED ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    report(f"\n## {name}: {heading}, {time.perf_counter() - part_start:.0f} s\n\n" + "\n".join(lines))
    return verdict

@contextlib.contextmanager
def alarm_at(deadline: float):
    """OutOfTime in the code it wraps once `deadline` passes, even in a compile; off outside, so a report is whole."""
    def out_of_time(signum, frame):
        raise OutOfTime()
    previous = signal.signal(signal.SIGALRM, out_of_time)
    signal.setitimer(signal.ITIMER_REAL, max(deadline - time.perf_counter(), 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

if __name__ == "__main__":
    main(sys.argv[1:])

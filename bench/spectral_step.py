"""Training-step speed and memory of spectral shifts on SD 1.5-shaped layers, as ratios.

    python bench/spectral_step.py [--repeats 5] [--latent 16] [--batch 2] [--threads 1]

The model: SD 1.5's down path and middle block built from ldm.unet's own blocks (ResBlocks,
SpatialTransformers with self- and cross-attention to a 77 x 768 context, GEGLU feed-forward,
3x3 convs 320..1280 channels, strided downsampling convs, the time-embedding MLP), on a
16 x 16 latent (a 128 px image), batch 2. Variants, one training step each (forward, backward,
AdamW step):

    frozen base  every weight frozen, backward to the activations only: the floor
    ours         spectral.attach: the autograd Functions of spectral/function.py
    mkshing      mkshing/svdiff-pytorch's layer classes (their layers.py, imported by path)
                 swapped in for the same layers: W rebuilt with autograd in every forward
                 (their U, S, Vh are filled from our SVD cache rather than recomputed)
    LoRA r=4     rank-4 adapters on the attention projections q, k, v, out (train/lora.py)

Times are medians of interleaved repeats (the variants take turns, so a busy machine slows
them alike) of the CPU time a step uses (time.process_time), which other processes on a shared
machine barely disturb, and of its wall time. One thread by default: on a shared machine a
multi-threaded op mostly measures how long its threads wait for each other.

Arithmetic: the floating-point operations of one step (torch.utils.flop_counter: matmuls,
convs, attention; forward and backward), for the same variants. It says how much of a time
ratio is the method's arithmetic and how much is overhead. For ours it is also about the floor of any exact
implementation: per layer the delta gradient needs x V^T and dY U, or dW = dY^T x and a
diagonal of U^T dW V, on top of the base's forward and input gradient. For a square d x d
layer applied to N tokens that is 4 N d^2 multiply-adds (factored) against the base's 2 N d^2,
or 3 N d^2 + 3 d^3 (rebuilding W_delta in forward and backward; 3 N d^2 + 2 d^3 even if it
were kept), so below N = 2..3 d nothing exact beats 2x on those layers (spectral/function.py's
cost model picks the cheaper form per call). At a 16 x 16 latent all of SD 1.5's square
attention projections are in that regime; at 64 x 64 the finest level has 25x more tokens
than channels and the ratio falls.

Memory: the bytes autograd saves between forward and backward; the weight matrices' state
(base W; ours U + sigma + Vh + delta; mkshing W + U + S + Vh + delta); and the peak resident
memory of a training step above the process's start, in a fresh process per variant (Linux
VmHWM, reset after a first step).

--unet: the whole UNet at SD 1.5 widths (860 M parameters) instead of the blocks. Its weight
matrices are made from random factors, W = U diag(S) Vh, which ours then attaches in place of
the SVD (that of all 860 M weights is about an hour of CPU): both variants compute the same
function on the same values. mkshing is left out (its W + U + S + Vh and the rebuilt weights it
saves for backward do not fit in memory beside the others).
"""

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import spectral  # noqa: E402
from spectral.cache import Factors, SVDCache, svd_key  # noqa: E402
from train import lora  # noqa: E402
from ldm.unet import (Block, Downsample, ResBlock, SpatialTransformer, UNetConfig,  # noqa: E402
                      UNetModel)

VARIANTS = ["frozen base", "ours", "mkshing", "LoRA r=4"]
UNET_VARIANTS = ["frozen base", "ours", "LoRA r=4"]   # mkshing's copies of the whole UNet do not fit


# --------------------------------------------------------------------------- the model

class Stack(nn.Module):
    """SD 1.5 input blocks (one ResBlock + transformer per level) and the middle block."""

    def __init__(self):
        super().__init__()
        config = UNetConfig.sd15()
        self.time_embed = nn.Sequential(nn.Linear(320, 1280), nn.SiLU(), nn.Linear(1280, 1280))
        emb = 1280
        self.blocks = nn.ModuleList([
            Block(ResBlock(320, emb, 320), SpatialTransformer(320, config)),
            Block(Downsample(320)),
            Block(ResBlock(320, emb, 640), SpatialTransformer(640, config)),
            Block(Downsample(640)),
            Block(ResBlock(640, emb, 1280), SpatialTransformer(1280, config)),
            Block(Downsample(1280)),
            Block(ResBlock(1280, emb, 1280), SpatialTransformer(1280, config), ResBlock(1280, emb, 1280)),
        ])

    def forward(self, x, time_features, context):
        emb = self.time_embed(time_features)
        for block in self.blocks:
            x = block(x, emb, context)
        return x


def make_model(unet: bool) -> tuple[nn.Module, dict[str, Factors] | None]:
    """The model, and for --unet the random factors its weight matrices were made from."""
    if not unet:
        return Stack(), None
    model = UNetModel(UNetConfig.sd15())
    return model, factored_weights(model)


def factored_weights(model: nn.Module) -> dict[str, Factors]:
    """Set every weight matrix attach would shift to U diag(S) Vh of random factors; return the
    factors by the weight's cache key (--unet, where the SVD of all 860 M weights would be an hour
    of CPU). Ours then computes the base's function on the same values, which a CPU timing needs:
    "a step costs the same whatever the values" fails for denormal numbers, which slow some CPU
    ops several-fold, so both variants must see the same ones."""
    g = torch.Generator().manual_seed(0)
    factors = {}
    for module in spectral.layers.targets(model).values():
        if module.weight.dim() < 2:
            continue
        m, n = module.weight.shape[0], module.weight[0].numel()
        r = min(m, n)
        f = Factors(torch.randn(m, r, generator=g) / m ** 0.5, torch.rand(r, generator=g),
                    torch.randn(r, n, generator=g) / n ** 0.5)
        with torch.no_grad():
            module.weight.copy_(((f.U * f.S) @ f.Vh).view_as(module.weight))
        factors[svd_key(module.weight)] = f
    return factors


def inputs(unet: bool, batch: int, latent: int):
    """(x, time input, context): the latent (UNet) or the 320-channel features of the first
    block (stack), timesteps or their 320-dim features, a 77 x 768 text context."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4 if unet else 320, latent, latent, generator=g).requires_grad_()
    time_input = torch.randint(0, 1000, (batch,), generator=g) if unet else torch.randn(batch, 320, generator=g)
    return x, time_input, torch.randn(batch, 77, 768, generator=g)


@contextlib.contextmanager
def served(factors: dict[str, Factors]):
    """attach takes its factors from `factors` (by cache key) instead of the SVD cache."""
    with mock.patch.object(SVDCache, "load", lambda self, matrix, key: factors[key]), \
            mock.patch.object(SVDCache, "contains", lambda self, key: True):
        yield


# --------------------------------------------------------------------------- the variants

def mkshing_layers():
    """mkshing/svdiff-pytorch's layers.py (their package __init__ needs an old diffusers)."""
    spec = importlib.util.find_spec("svdiff_pytorch")
    if spec is None:
        raise SystemExit("install svdiff-pytorch (pip install --no-deps svdiff-pytorch einops)")
    path = os.path.join(spec.submodule_search_locations[0], "layers.py")
    module_spec = importlib.util.spec_from_file_location("mkshing_layers", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def to_mkshing(model: nn.Module, cache_dir) -> None:
    """Swap every Linear / Conv2d / GroupNorm / LayerNorm for their SVD* class with the same
    weights. Built on the meta device to skip their SVD of a random init; their U, S, Vh are
    then set from our SVD cache (the same decomposition, so their forward and memory are theirs
    and the bench does not spend minutes redoing it)."""
    theirs, cache = mkshing_layers(), SVDCache(cache_dir)
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            with torch.device("meta"):
                if type(m) is nn.Linear:
                    new = theirs.SVDLinear(m.in_features, m.out_features, bias=m.bias is not None)
                elif type(m) is nn.Conv2d:
                    new = theirs.SVDConv2d(m.in_channels, m.out_channels, m.kernel_size[0], stride=m.stride,
                                           padding=m.padding, bias=m.bias is not None)
                elif type(m) is nn.GroupNorm:
                    new = theirs.SVDGroupNorm(m.num_groups, m.num_channels, eps=m.eps)
                elif type(m) is nn.LayerNorm:
                    new = theirs.SVDLayerNorm(m.normalized_shape[0], eps=m.eps)
                else:
                    continue
            new = new.to_empty(device="cpu")
            new.load_state_dict({**m.state_dict(), "delta": torch.zeros_like(new.delta)})
            if m.weight.dim() > 1:
                new.U, new.S, new.Vh = cache.get(m.weight.detach().reshape(m.weight.shape[0], -1))
                new.done_svd = True
            else:
                new.perform_svd()
            new.requires_grad_(False)
            new.delta.requires_grad_(True)
            setattr(parent, name, new)


def build(variant: str, plain: nn.Module, factors: dict[str, Factors] | None, args
          ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    """The variant and its optimizer (None for the frozen base, which is `plain` itself); ours
    takes its factors from `factors` when given (--unet), else from the SVD cache."""
    plain.requires_grad_(False)
    if variant == "frozen base":
        return plain, None
    model = copy.deepcopy(plain)
    if variant == "ours":
        with served(factors) if factors is not None else contextlib.nullcontext():
            shifts = spectral.attach(model, cache_dir=args.cache_dir)
        return model, torch.optim.AdamW(shifts.param_groups(lr=1e-3, norm_lr=1e-6))
    if variant == "mkshing":
        to_mkshing(model, args.cache_dir)
    else:
        lora.attach(model, rank=4, targets=lora.UNET_TARGETS)   # the project's one LoRA
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def step_flops(model, optimizer, batch) -> int:
    """Floating-point operations (2 per multiply-add) of one training step."""
    with FlopCounterMode(display=False) as counter:
        step(model, optimizer, batch)
    return counter.get_total_flops()


def step(model, optimizer, batch) -> None:
    x = batch[0]
    x.grad = None
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    model(*batch).square().mean().backward()
    if optimizer is not None:
        optimizer.step()


# --------------------------------------------------------------------------- memory

def set_malloc(for_timing: bool) -> None:
    """Fix glibc's allocation policy, which otherwise moves with the allocation history.

    Timing: tensors up to 256 MB come from the heap and freed memory stays there (no trimming),
    so a step reuses the pages of the one before, as a caching allocator (CUDA's) does. With
    trimming, glibc hands memory back between steps and the next step spends up to seconds
    page-faulting it in again, by an amount that depends on the order of allocations rather than
    on the work. Peak memory: every tensor over 64 KB is its own mapping, returned when freed, so
    resident memory follows the live tensors."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 256 << 20 if for_timing else 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, -1 if for_timing else 128 * 1024)      # -1: never trim


def release_memory() -> None:
    """Give freed heap memory back to the system (before the peak runs start)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the weight matrices' state: base W; ours U + sigma + Vh + delta; mkshing
    W + U + S + Vh + delta (their factors are plain attributes, not buffers)."""
    total = 0
    for m in model.modules():
        if isinstance(m, spectral.layers.Spectral):
            total += sum(t.numel() * t.element_size() for t in (m.U, m.sigma, m.Vh, m.delta))
        elif hasattr(m, "done_svd"):
            if m.weight.dim() > 1:
                total += sum(t.numel() * t.element_size() for t in (m.weight, m.U, m.S, m.Vh, m.delta))
        elif type(m) in (nn.Linear, nn.Conv2d):
            total += m.weight.numel() * m.weight.element_size()
    return total


def full_model_state_ratio() -> float:
    """(U + sigma + Vh + delta) / W over every weight matrix of the whole UNet and text encoder,
    counted on the meta device."""
    from spectral.count import build
    base = ours = 0
    for model in build("sd15").values():
        for module in spectral.layers.targets(model).values():
            if module.weight.dim() > 1:
                m, n = module.weight.shape[0], module.weight[0].numel()
                r = min(m, n)
                base, ours = base + m * n, ours + r * (m + n) + 2 * r
    return ours / base


def saved_bytes(model, optimizer, batch) -> int:
    """Distinct bytes autograd keeps for backward during one forward."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*batch)
    out.square().mean().backward()
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    weights = {(t.untyped_storage().data_ptr(), t.device) for t in list(model.parameters()) + list(model.buffers())}
    return sum(nbytes for key, nbytes in seen.items() if key not in weights)


def peak_step_memory(variant: str, args) -> int:
    """Peak resident bytes of one training step above the process's start (model, optimizer
    state, activations), in a fresh process; VmHWM is reset after a first step."""
    command = [sys.executable, os.path.abspath(__file__), "--peak-of", variant, "--latent", str(args.latent),
               "--batch", str(args.batch), "--threads", str(args.threads)] + (["--unet"] if args.unet else [])
    if args.cache_dir:
        command += ["--cache-dir", args.cache_dir]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak"]


def vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_peak(variant: str, args) -> None:
    set_malloc(for_timing=False)
    baseline = vm_kb("VmRSS")
    torch.manual_seed(0)
    model, optimizer = build(variant, *make_model(args.unet), args)   # (a base copy is freed)
    batch = inputs(args.unet, args.batch, args.latent)
    step(model, optimizer, batch)                         # allocate optimizer state
    with open("/proc/self/clear_refs", "w") as f:         # reset the high-water mark
        f.write("5")
    step(model, optimizer, batch)
    print(json.dumps({"peak": (vm_kb("VmHWM") - baseline) * 1024}))


# --------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, more threads mostly measure waiting)")
    parser.add_argument("--cache-dir", default=None, help="SVD cache (default ~/.cache/svdiff/svd)")
    parser.add_argument("--unet", action="store_true",
                        help="the whole UNet at SD 1.5 widths instead of the blocks: frozen base, ours "
                             "(random factors in place of the SVD, see above) and LoRA")
    parser.add_argument("--peak-of", choices=VARIANTS, help=argparse.SUPPRESS)   # internal: one peak run
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.peak_of:
        return measure_peak(args.peak_of, args)
    set_malloc(for_timing=True)

    torch.manual_seed(0)
    variants = UNET_VARIANTS if args.unet else VARIANTS
    plain, factors = make_model(args.unet)
    batch = inputs(args.unet, args.batch, args.latent)
    print(f"SD 1.5 {'UNet' if args.unet else 'down path + middle block'}, "
          f"{sum(p.numel() for p in plain.parameters()) / 1e6:.0f} M parameters, latent {args.latent}x{args.latent}, "
          f"batch {args.batch}, {args.threads} thread(s)")
    models = {}
    for variant in variants:
        start = time.perf_counter()
        models[variant] = build(variant, plain, factors, args)
        print(f"  built {variant} in {time.perf_counter() - start:.1f} s", flush=True)
    del plain, factors

    cpu, wall = {v: [] for v in variants}, {v: [] for v in variants}
    for v, (model, optimizer) in models.items():
        step(model, optimizer, batch)                                        # warm-up
    for repeat in range(args.repeats):
        for v, (model, optimizer) in models.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            step(model, optimizer, batch)
            cpu[v].append(time.process_time() - start_cpu)
            wall[v].append(time.perf_counter() - start)
        print(f"  repeat {repeat + 1}/{args.repeats} (cpu s): " + ", ".join(f"{v} {cpu[v][-1]:.2f}" for v in variants),
              flush=True)
    median = {v: statistics.median(t) for v, t in cpu.items()}
    median_wall = {v: statistics.median(t) for v, t in wall.items()}
    flops = {v: step_flops(model, optimizer, batch) for v, (model, optimizer) in models.items()}
    saved = {v: saved_bytes(model, optimizer, batch) for v, (model, optimizer) in models.items()}
    state = {v: state_bytes(model) for v, (model, _) in models.items()}
    del models
    release_memory()
    peak = {v: peak_step_memory(v, args) for v in variants}

    base = "frozen base"
    print(f"\n{'variant':12s} {'cpu s':>7s} {'vs base':>8s} {'wall s':>7s} {'vs base':>8s} {'GFLOP':>7s} {'vs base':>8s} "
          f"{'saved MB':>9s} {'vs base':>8s} {'peak MB':>8s} {'vs base':>8s} {'matrix state MB':>15s} {'vs base':>8s}")
    for v in variants:
        print(f"{v:12s} {median[v]:7.2f} {median[v] / median[base]:7.2f}x {median_wall[v]:7.2f} "
              f"{median_wall[v] / median_wall[base]:7.2f}x {flops[v] / 1e9:7.1f} {flops[v] / flops[base]:7.2f}x "
              f"{saved[v] / 1e6:9.0f} {saved[v] / saved[base]:7.2f}x {peak[v] / 1e6:8.0f} {peak[v] / peak[base]:7.2f}x "
              f"{state[v] / 1e6:15.0f} {state[v] / state[base]:7.2f}x")
    print(f"\nours' matrix state over the whole SD 1.5 UNet + text encoder: {full_model_state_ratio():.2f}x the weights")
    print("goals, this run:")
    for line in goal_lines(median, state):
        print("  " + line)


def goal_lines(median: dict[str, float], state: dict[str, int]) -> list[str]:
    """Each speed / memory goal with the ratio measured in this run and whether it is met."""
    base = "frozen base"
    goals = [("ours' step time / frozen base", median["ours"] / median[base], "<=", 1.25),
             ("ours' matrix state / frozen base", state["ours"] / state[base], "<=", 1.3)]
    if "mkshing" in median:
        goals.append(("mkshing's step time / ours", median["mkshing"] / median["ours"], ">=", 2.0))
    lines = []
    for name, ratio, op, bound in goals:
        met = ratio <= bound if op == "<=" else ratio >= bound
        lines.append(f"{name} {ratio:.2f}x (goal {op} {bound}x: {'met' if met else 'NOT met'})")
    return lines


if __name__ == "__main__":
    main()

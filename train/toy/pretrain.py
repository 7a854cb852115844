"""Pretrain the bundled tiny Stable Diffusion on the toy world (train/toy/world.py).

    python -m train.toy.pretrain --output-dir DIR            # DIR/toy-sd.safetensors + DIR/tokenizer/
    python -m train.toy.pretrain --output-dir DIR --resume   # continue it from runs/pretrain/
    python -m train.toy.pretrain --overwrite                 # replace the bundled files in weights/

Four stages, all with our ldm/ classes at tiny width, fp32, on CPU:

1. Tokenizer: CLIP-format BPE over the toy vocabulary (train/toy/tokenizer.py).
2. VAE (AutoencoderKL, f = 2: 32x32x3 -> 16x16x4). Loss per image, as in CompVis' first stage
   without its LPIPS and GAN terms:  sum |x - D(z)| + kl_weight * KL(q(z|x) || N(0, I)),
   z ~ q(z|x). Its training images carry random two-color patterns besides flat fills: the VAE
   is a generic codec (as SD's is) and must be able to encode the subjects' patterns later,
   while the diffusion model never sees a pattern. After training, scale_factor = 1 / std(z)
   (SD's 0.18215 was chosen the same way), so latents have unit variance.
3. UNet + text encoder, jointly, epsilon prediction on the SD scaled-linear schedule:
   L = E_{x, c, t, eps} || eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, tau(c)) ||^2,
   with the caption c replaced by "" 10% of the time (classifier-free guidance training).
   The text encoder (transformers CLIPTextModel, 2 layers, width 64) is *trained*, not frozen:
   no pretrained CLIP exists here, and a frozen random encoder would hand the UNet features in
   which "red star on the left" is entangled at random; training it lets word embeddings take
   meaning, so that spectral shifts of the text encoder (train.single --train-text-encoder) act
   on a meaningful space. The reserved tokens (sks, zwx, ...) never occur in captions, so their
   embeddings get no gradient and keep their random initialization (weight decay is 0 for
   that reason): like a rare token in real CLIP, they start out meaning nothing.
   The weights saved are an exponential moving average (decay `ema`) of the trained ones.
4. Grounding: a fine-tune of stage 3's result (its EMA weights, a fresh AdamW, the same data,
   batch and learning rate) for `ground_steps` steps that also supervise where a placed pair's
   words look. Without it, "a red star on the left and a blue circle on the right" gives both
   objects, each on a random side (weights/README.md): the diffusion loss alone did not teach
   the UNet to read a side from the side words within our budgets, though the text features
   carry it. The two clauses of such a caption (c = "a red star on the left", c' = "a blue
   circle on the right") each own a half of the image; at every position q of c's half,
       L_ground = -log( A_c(q) / (A_c(q) + A_c'(q)) ),
   A_c(q) = the attention probability from q to c's tokens (summed over them, averaged over
   heads), averaged over q, clauses, placed pairs in the batch and every cross-attention layer
   (8x8 and 4x4). A ratio between the two clauses, not train.multi's squared share (the unmix
   loss): that one fell to 0 while the sides stayed random (a share is also small when a clause
   gets little attention anywhere). Loss: diffusion + ground_weight * L_ground. Run as a
   continuation of stage 3 (its raw weights and optimizer state) the same loss did not bind;
   as a fine-tune it did (weights/README.md, Quality bar). Supervising cross-attention with
   where objects are is TokenCompose's idea (Wang et al., 2024), which fine-tunes SD with
   object masks; the toy world knows each object's half exactly.

Resumable: the whole state (models, optimizer, EMA, stage, step) is written atomically
(temp file + rename) every `save_every` steps to runs/pretrain/state.pt; each step draws its
batch, timesteps, noise and caption drops from a generator seeded by (seed, step), so a
resumed run continues exactly the same sequence. Loss log: runs/pretrain/log.csv; sample
grids: runs/pretrain/samples/. The result is ONE single-file checkpoint in CompVis layout with
the config in its metadata (ldm.checkpoint.save_single_file): the same file format and loading
path as a real SD 1.x checkpoint.
"""
import contextlib
import copy
import csv
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from edit.cli import check_output_dir, check_range, usage_errors
from ldm.files import CheckpointError, load_pickle
from spectral.io import write_atomically
from train import config as run_config
from train.config import option
from train.data import step_generator, to_tensor
from train.multi import CrossAttentionMaps, half_columns
from train.toy import world
from train.toy.architecture import build_unet_and_text, build_vae, bundle, check_architecture
from train.toy.tokenizer import build as build_tokenizer


@dataclass
class PretrainConfig:
    """Every setting of a run; each field is also a flag (vae_ch_mult: --vae-ch-mult 2,2)."""
    output_dir: str = option("weights", "where toy-sd.safetensors, tokenizer/ and pretrain_log.csv go",
                             metavar="DIR", same_on_resume=False)
    work_dir: str = option("runs/pretrain", "resumable state, loss log and sample grids",
                           metavar="DIR", same_on_resume=False)
    # step_generator's seeds (seed * 1_000_003 + ...) must stay below 2**64
    seed: int = option(0, "seeds the datasets, the initialization and every step's draws",
                       minimum=0, maximum=2**40)
    num_images: int = option(30000, "distinct captioned scenes (dataset seed = --seed)", minimum=2)
    # VAE
    vae_ch: int = option(32, "VAE base width", minimum=1)
    # the full-resolution level is 64 wide: GroupNorm has 32 groups (SD's), and with one channel
    # per group it is an instance norm right before conv_out, which erases a flat image's
    # absolute color (measured: a (1, 2) VAE renders every object brown); two per group keep it
    vae_ch_mult: tuple[int, ...] = option((2, 2), "VAE width multiplier per level")
    vae_res_blocks: int = option(1, "VAE res blocks per level", minimum=1)
    vae_steps: int = option(2000, "VAE optimizer steps", minimum=1)
    vae_batch_size: int = option(16, "images per VAE step", minimum=1)
    vae_lr: float = option(1e-3, "VAE learning rate (warmup, then cosine decay to 10%)", minimum=0)
    kl_weight: float = option(1e-6, "weight of the VAE's KL term", minimum=0)
    # UNet (SD 1 layout: conv proj_in/out, num_heads, no attention at the finest level)
    model_channels: int = option(32, "UNet base width", minimum=1)
    channel_mult: tuple[int, ...] = option(   # 64 wide at the output norm, as for the VAE
        (2, 2, 2), "UNet width multiplier per level")
    attention_resolutions: tuple[int, ...] = option((2, 4), "UNet downsampling factors with attention")
    num_res_blocks: int = option(1, "UNet res blocks per level", minimum=1)
    num_heads: int = option(4, "UNet attention heads", minimum=1)
    # text encoder (CLIPTextModel, quick_gelu like SD 1's CLIP ViT-L/14)
    text_width: int = option(64, "text encoder width (the UNet's context_dim)", minimum=1)
    text_layers: int = option(2, "text encoder layers", minimum=1)
    text_heads: int = option(2, "text encoder attention heads", minimum=1)
    # UNet + text training
    steps: int = option(16000, "UNet + text encoder steps; with --resume, more than before "
                        "continues (until grounding has begun)", minimum=1, same_on_resume=False)
    batch_size: int = option(32, "captioned images per UNet step", minimum=1)
    lr: float = option(6e-4, "UNet + text encoder learning rate (constant after the warmup)", minimum=0)
    warmup: int = option(200, "UNet steps of linear learning-rate warmup", minimum=1)
    p_uncond: float = option(0.1, "share of captions replaced by '' (classifier-free guidance), "
                             "0 to 1", minimum=0, maximum=1)
    ema: float = option(0.999, "decay of the weights' moving average, which is what is saved; "
                        "at least 0, below 1", minimum=0, below=1)
    # grounding (stage 4)
    ground_steps: int = option(3000, "steps of grounding, a fine-tune of the --steps result that "
                               "also trains where placed pairs' words look (0: none)", minimum=0,
                               same_on_resume=False)
    ground_weight: float = option(0.02, "weight of grounding's loss on the cross-attention", minimum=0)
    # bookkeeping
    save_every: int = option(250, "write the resumable state every N steps", minimum=1,
                             same_on_resume=False)
    sample_every: int = option(500, "write a sample grid every N UNet steps", minimum=1,
                               same_on_resume=False)
    threads: int = option(0, "torch CPU threads; 0: torch's default (one per core)", minimum=0,
                          same_on_resume=False)
    sample_steps: int = option(25, "DDIM steps of the sample grids, 1 to 999", minimum=1, maximum=999,
                               same_on_resume=False)
    guidance: float = option(4.0, "classifier-free guidance of the sample grids", minimum=0,
                             same_on_resume=False)


SAMPLE_PROMPTS = [
    "a red star", "a blue circle", "a green triangle", "a yellow heart",
    "a purple square on the left", "an orange star on the right",
    "a red star on the left and a blue circle on the right",
    "a green heart on the right and a yellow square on the left",
    "a green triangle beside a purple circle",
]


# ---------------------------------------------------------------- learning rates

def lr_at(step, total, base, warmup):
    """Linear warmup, then cosine decay to 10% of base."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def lr_constant(step, base, warmup):
    """Linear warmup, then constant: the EMA of the weights does the annealing, and a run
    stopped early (or resumed with more --steps) is as good as one planned that long."""
    return base * min(1.0, (step + 1) / warmup)


# ---------------------------------------------------------------- state and logs

def save_state(path, state):
    """Atomic: a crash leaves either the old file or the new one, never half of one."""
    write_atomically(lambda temporary: torch.save(state, temporary), path)


def log_row(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


# ---------------------------------------------------------------- stage 2: VAE

def train_vae(config, vae, state, work):
    # channels last, the pixels' own memory order: the layout the bundled weights were trained
    # on, and convolutions round differently on another (so does every result after them)
    images = to_tensor(world.texture_dataset(config.num_images // 2, config.seed + 1),
                       memory_format=torch.channels_last)
    if "vae_step" not in state:
        # start almost deterministic, std(z | x) = e^-5: with the initial std of 1 the decoder
        # sees mostly noise and learns the mean image for hundreds of steps; the tiny KL weight
        # would take far longer than our budget to shrink it
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.embed_dim:] = -10.0
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    if "vae_opt" in state:
        opt.load_state_dict(state["vae_opt"])
    start = state.get("vae_step", 0)
    bar = tqdm(range(start, config.vae_steps), initial=start, total=config.vae_steps, desc="vae")
    for step in bar:
        t0 = time.time()
        g = step_generator(config.seed, step, stream=1)
        x = images[torch.randint(len(images), (config.vae_batch_size,), generator=g)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config.vae_steps, config.vae_lr, 50)
        posterior = vae.encode(x)
        recon = vae.decode(posterior.sample(generator=g))
        rec = (recon - x).abs().sum() / len(x)
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).sum() / len(x)
        loss = rec + config.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mse = (recon - x).pow(2).mean().item()
        bar.set_postfix(l1=f"{rec.item() / x[0].numel():.4f}", mse=f"{mse:.5f}")
        log_row(os.path.join(work, "log.csv"), dict(stage="vae", step=step + 1, loss=round(loss.item(), 5),
                mse=round(mse, 6), lr=opt.param_groups[0]["lr"], seconds=round(time.time() - t0, 3)))
        if (step + 1) % config.save_every == 0 or step + 1 == config.vae_steps:
            state.update(vae=vae.state_dict(), vae_opt=opt.state_dict(), vae_step=step + 1)
            save_state(os.path.join(work, "state.pt"), state)
    # scale_factor: unit-variance latents, as SD chose 0.18215 for its VAE
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 256]).mode() for i in range(0, 2048, 256)])
    vae.config.scale_factor = float(1 / z.std())
    state.update(vae=vae.state_dict(), scale_factor=vae.config.scale_factor, stage="latents")
    state.pop("vae_opt", None)
    save_state(os.path.join(work, "state.pt"), state)
    print(f"vae: scale_factor {vae.config.scale_factor:.4f}")


def encode_dataset(config, vae, work):
    """Latent mean and std of every pretraining scene, cached in the work dir."""
    path = os.path.join(work, "latents.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    images, scenes = world.dataset(config.num_images, config.seed)
    images = to_tensor(images, memory_format=torch.channels_last)   # as in train_vae
    means, stds = [], []
    with torch.no_grad():
        for i in tqdm(range(0, len(images), 256), desc="encode"):
            posterior = vae.encode(images[i:i + 256])
            means.append(posterior.mean)
            stds.append(posterior.std)
    data = dict(mean=torch.cat(means), std=torch.cat(stds), captions=[s.caption for s in scenes])
    write_atomically(lambda temporary: torch.save(data, temporary), path)
    return data


# ---------------------------------------------------------------- stage 3: UNet + text encoder

def train_unet(config, unet, text, scale_factor, data, state, work):
    from ldm.schedule import NoiseSchedule
    schedule = NoiseSchedule()
    token_ids = text.tokenize(data["captions"])          # (N, 77)
    uncond_ids = text.tokenize([""])[0]
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    if "opt" in state:
        opt.load_state_dict(state["opt"])
        ema_unet.load_state_dict(state["ema_unet"])
        ema_text.load_state_dict(state["ema_text"])
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    maps = None
    start, total = state.get("step", 0), config.steps + config.ground_steps
    bar = tqdm(range(start, total), initial=start, total=total, desc="unet+text")
    for step in bar:
        t0 = time.time()
        grounding = step >= config.steps
        if step == config.steps:     # stage 4 fine-tunes stage 3's result, with a fresh optimizer
            unet.load_state_dict(ema_unet.state_dict())
            text.load_state_dict(ema_text.state_dict())
            opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        if grounding and maps is None:   # from here on the attention runs as an explicit softmax
            maps = CrossAttentionMaps(unet)
            clauses, own_right = placed_pair_clauses(text, token_ids)
            placed = clauses.any(dim=(1, 2))
            bar.set_description("grounding")
        g = step_generator(config.seed, step, stream=2)
        index = torch.randint(len(token_ids), (config.batch_size,), generator=g)
        z = data["mean"][index] + data["std"][index] * torch.randn(data["mean"][index].shape, generator=g)
        z = scale_factor * z
        ids = token_ids[index].clone()
        dropped = torch.rand(config.batch_size, generator=g) < config.p_uncond
        ids[dropped] = uncond_ids
        t = torch.randint(schedule.num_train_timesteps, (config.batch_size,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        with maps.forward_pass() if grounding else contextlib.nullcontext():
            pred = unet(schedule.add_noise(z, noise, t), t, text(ids))
        loss = (pred - noise).pow(2).mean()
        if grounding:   # on the placed pairs whose caption was kept
            kept = (~dropped & placed[index]).nonzero().squeeze(1)
            ground = loss.new_zeros(()) if not len(kept) else grounding_loss(
                [m[kept] for m in maps.maps], clauses[index[kept]], own_right[index[kept]], z.shape[-2:])
            loss = loss + config.ground_weight * ground
        for group in opt.param_groups:
            group["lr"] = lr_constant(step, config.lr, config.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(config.ema, (1 + step) / (10 + step))   # short warmup of the average
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        shown = {"ground": f"{ground.item():.3f}"} if grounding else {}
        bar.set_postfix(loss=f"{loss.item():.4f}", **shown)
        log_row(os.path.join(work, "log.csv"), dict(
            stage="ground" if grounding else "unet", step=step + 1, loss=round(loss.item(), 5),
            mse=round(grad_norm.item(), 4), lr=opt.param_groups[0]["lr"],
            seconds=round(time.time() - t0, 3)))
        done = step + 1 == total
        if (step + 1) % config.save_every == 0 or done:
            state.update(unet=unet.state_dict(), text=text.state_dict(), opt=opt.state_dict(),
                         ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(), step=step + 1)
            save_state(os.path.join(work, "state.pt"), state)
        if (step + 1) % config.sample_every == 0 or done:
            sample_grid(config, ema_unet, ema_text, schedule, work, step + 1)
    return ema_unet, ema_text


def placed_pair_clauses(text, token_ids):
    """The two clauses of every placed-pair caption, found in its tokens: clauses (N, 2, 77)
    bool, True on the tokens of the caption's first / second clause ("a red star on the left" /
    "a blue circle on the right", split at the "and" between the side words; all False for other
    captions), and own_right (N, 2) bool: that clause's object is on the right."""
    def word(w):
        return text.tokenize([w])[0][1].item()
    left, right, conjunction, end = word("left"), word("right"), word("and"), text.tokenizer.eos_token_id
    clauses = torch.zeros(*token_ids.shape[:1], 2, token_ids.shape[1], dtype=torch.bool)
    own_right = torch.zeros(len(token_ids), 2, dtype=torch.bool)
    for n, ids in enumerate(token_ids.tolist()):
        sides = [i for i, token in enumerate(ids) if token in (left, right)]
        if len(sides) != 2:
            continue                    # one object, or an unplaced pair: nothing to ground
        split = next(i for i in range(sides[0], sides[1]) if ids[i] == conjunction)
        clauses[n, 0, 1:split] = True
        clauses[n, 1, split + 1:ids.index(end)] = True
        own_right[n] = torch.tensor([ids[sides[0]] == right, ids[sides[1]] == right])
    return clauses, own_right


def grounding_loss(maps, clauses, own_right, latent_size):
    """Stage 4's L_ground (module docstring). maps: one (B, Lq, 77) per cross-attention layer,
    probabilities averaged over heads, Lq = (h/ds) * (w/ds) for the latent size (h, w);
    clauses (B, 2, 77), own_right (B, 2): placed_pair_clauses of the B captions."""
    per_layer = []
    for attention in maps:
        rows, cols, own_half = half_columns(latent_size, attention.shape[1], own_right)  # (B, 2, cols)
        shares = torch.einsum("bqk,bck->bcq", attention, clauses.to(attention))  # (B, 2, Lq): A_c(q)
        ratio = shares / (shares.sum(dim=1, keepdim=True) + 1e-8)
        nll = -torch.log(ratio + 1e-6).view(*ratio.shape[:2], rows, cols)
        per_layer.append((nll * own_half[:, :, None, :]).sum(dim=(2, 3)).mean() / (rows * (cols // 2)))
    return torch.stack(per_layer).mean()


def sample_grid(config, unet, text, schedule, work, step):
    """Two samples per SAMPLE_PROMPTS entry (columns), EMA weights, PNG in work/samples/."""
    from edit.grid import save_grid
    images = bundle(sample_grid.vae, unet, text).generate(
        SAMPLE_PROMPTS * 2, steps=config.sample_steps, guidance=config.guidance, seed=config.seed,
        progress=False, batch_size=50)
    os.makedirs(os.path.join(work, "samples"), exist_ok=True)
    path = os.path.join(work, "samples", f"step_{step:06d}.png")
    save_grid(images, path, columns=len(SAMPLE_PROMPTS), padding=4, scale=4)
    tqdm.write(f"samples: {path}")
    return path


# ---------------------------------------------------------------- export

def export(config, vae, unet, text, tokenizer_dir, work):
    from ldm.checkpoint import save_single_file
    model = bundle(vae, unet, text)
    path = os.path.join(config.output_dir, "toy-sd.safetensors")
    settings = json.dumps(dataclasses.asdict(config))
    save_single_file(path, model, extra_metadata={"train.toy.pretrain": settings})
    shutil.copyfile(os.path.join(work, "log.csv"), os.path.join(config.output_dir, "pretrain_log.csv"))
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) and {tokenizer_dir}/")
    return path


# ---------------------------------------------------------------- the run, checked first

EARLIER_RUN = ("state.pt", "log.csv", "latents.pt")    # in WORK_DIR
RESULTS = ("toy-sd.safetensors", "pretrain_log.csv")    # in OUTPUT_DIR, written at the end
TOKENIZER = ("tokenizer/vocab.json", "tokenizer/merges.txt")   # written first: a resumed run's own


def check_settings(config):
    """ValueError (one line) for what the fields' ranges cannot say: sizes per level, and whether
    the architecture builds."""
    for name in ("vae_ch_mult", "channel_mult", "attention_resolutions"):
        check_range(run_config.flag(name), min(getattr(config, name), default=1), 1)
    check_architecture(config)


def start(config, resume=False, overwrite=False):
    """The state a run starts from, WORK_DIR/state.pt with --resume, else {} (an earlier run there
    removed with --overwrite); results in OUTPUT_DIR need --overwrite. Else ValueError."""
    check_output_dir(config.output_dir, RESULTS if resume else RESULTS + TOKENIZER, overwrite,
                     way_out="replace them with --overwrite, or give another --output-dir")
    earlier = check_output_dir(config.work_dir, EARLIER_RUN, overwrite or resume, flag="--work-dir",
                               way_out="continue that run with --resume, or replace it with --overwrite")
    state_path = os.path.join(config.work_dir, "state.pt")
    if not resume:
        for path in earlier + sorted(Path(config.work_dir, "samples").glob("step_*.png")):
            path.unlink()                  # --overwrite: a fresh run, a fresh log and grids
        return {}
    if not os.path.exists(state_path):
        raise ValueError(f"--resume: --work-dir {config.work_dir} holds no state.pt to continue")
    try:
        state = load_pickle(state_path)
    except CheckpointError as error:
        raise ValueError(str(error)) from None
    if not isinstance(state, dict) or "stage" not in state:
        raise ValueError(f"{state_path}: not a state written by train.toy.pretrain")
    check_resumable(config, state, state_path)
    return state


def check_resumable(config, state: dict, state_path: str) -> None:
    """ValueError unless `config` continues the run of `state` exactly: the same settings but
    those marked same_on_resume=False (where files go, how long it runs, how often it saves and
    shows; a field the state's run did not have yet is not compared), and --steps unchanged once
    grounding, which starts at step --steps, has begun."""
    saved = json.loads(state.get("config", "{}"))
    now = run_config.as_dict(config)
    changed = run_config.changed_on_resume(config, {**now, **saved})
    if changed:
        name = changed[0]
        raise ValueError(f"--resume: {state_path} was made with {run_config.flag(name)} {saved[name]}, "
                         f"this run gives {now[name]}; resuming takes the same value")
    grounding_began = "steps" in saved and state.get("step", 0) > saved["steps"]
    if grounding_began and config.steps != saved["steps"]:
        raise ValueError(f"--resume: {state_path} is grounding since step {saved['steps']}; "
                         f"give --steps {saved['steps']} (more --ground-steps may be given)")


def pretrain(config, resume=False, overwrite=False):
    """Check, then run; returns the path of the checkpoint written."""
    check_settings(config)
    return run(config, start(config, resume, overwrite))


def run(config, state):
    """The three stages from `state` (see start) to OUTPUT_DIR/toy-sd.safetensors."""
    if config.threads:   # on a shared machine one thread per process beats oversubscription
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    work = config.work_dir
    os.makedirs(work, exist_ok=True)
    state.setdefault("stage", "vae")
    state["config"] = json.dumps(dataclasses.asdict(config))
    tokenizer_dir = os.path.join(config.output_dir, "tokenizer")
    build_tokenizer(tokenizer_dir)
    vae = build_vae(config)
    if "vae" in state:
        vae.load_state_dict(state["vae"])
    if state["stage"] == "vae":
        train_vae(config, vae, state, work)
    vae.config.scale_factor = state["scale_factor"]
    vae.requires_grad_(False)
    data = encode_dataset(config, vae, work)
    unet, text = build_unet_and_text(config, tokenizer_dir)
    if "unet" in state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
    sample_grid.vae = vae
    if state.get("step", 0) < config.steps + config.ground_steps:   # also: resumed with more steps
        state["stage"] = "unet"
        unet, text = train_unet(config, unet, text, vae.config.scale_factor, data, state, work)
    else:
        unet.load_state_dict(state["ema_unet"])
        text.load_state_dict(state["ema_text"])
    return export(config, vae, unet, text, tokenizer_dir, work)


def build_parser():
    """One flag per PretrainConfig field (train/config.py), and --resume, --overwrite: what to
    do with earlier files, not settings of the run."""
    parser = run_config.build_parser(PretrainConfig, "python -m train.toy.pretrain",
                                     __doc__.split("\n")[0])
    parser.add_argument("--resume", action="store_true", help="continue from WORK_DIR/state.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace toy-sd.safetensors, tokenizer/ and pretrain_log.csv in "
                             "OUTPUT_DIR and, without --resume, an earlier run in WORK_DIR "
                             "(without it, the command refuses to write over them)")
    return parser


def main(argv=None):
    """Every check (settings, where files go, the state to resume) before the first step."""
    parser = build_parser()
    values = vars(parser.parse_args(argv))
    resume, overwrite = values.pop("resume"), values.pop("overwrite")
    config = run_config.to_config(parser, PretrainConfig, values)
    with usage_errors(parser):
        check_settings(config)
        state = start(config, resume, overwrite)
    t0 = time.time()
    run(config, state)
    print(f"pretraining took {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""What the unmix loss adds to a train.multi step, as a ratio measured in one run.

    python bench/unmix_step.py [--model PATH] [--repeats 15] [--batch-size 8] [--threads 1]

One training step of train.multi (text encoder, UNet forward, loss, backward, AdamW step of the
spectral shifts) on a batch where every example is cut-mixed (the unmix loss's worst case) and
as many prior examples, the latents fixed beforehand (making them costs the same either way):

    without  --unmix-weight 0: no attention probe, fused attention everywhere
    with     the probe on every cross-attention layer (explicit softmax there), the maps kept,
             each caption's identifier tokens found, L_unmix computed and back-propagated

Times are medians of interleaved repeats (the two take turns, so a busy machine slows both
alike) of the CPU time of a step (time.process_time). Default: the bundled tiny model at its
training batch (8 + 8); give an SD checkpoint with --model for its shapes (slow on a CPU).
"""

import argparse
import contextlib
import statistics
import time

import torch

from ldm.checkpoint import DEFAULT_MODEL, load
from train import multi
from train.single import diffusion_loss
from train.trainable import SpectralShifts


def step(model, optimizer, latents, captions, t, noise, identifiers, layouts, maps):
    """One optimizer step; with `maps`, the unmix loss on the cut-mixed examples too."""
    start = time.process_time()
    token_ids = model.text_encoder.tokenize(captions)
    targets = multi.unmix_targets(layouts, token_ids, identifiers) if maps else []
    with maps.forward_pass() if maps else contextlib.nullcontext():
        context = model.text_encoder(token_ids)
        per_sample = diffusion_loss(model, latents, context, t, noise)
    half = len(latents) // 2
    loss = per_sample[:half].mean() + per_sample[half:].mean()
    if maps:
        loss = loss + multi.unmix_loss(maps.maps, targets, tuple(latents.shape[-2:]))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return time.process_time() - start


def main():
    parser = argparse.ArgumentParser(prog="python bench/unmix_step.py", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint (default: the bundled tiny model)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per variant (default: 15)")
    parser.add_argument("--batch-size", type=int, default=8, help="cut-mixed examples, and as many "
                        "prior examples (default: 8)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    model.unet.train()
    trainable = SpectralShifts(model, text_encoder=True, svd_cache=None)
    optimizer = torch.optim.AdamW(trainable.param_groups(1e-4, 1e-6))
    subjects = [multi.Subject("", "a sks star", "a star"), multi.Subject("", "a zwx star", "a star")]
    generator = torch.Generator().manual_seed(0)
    layouts = [multi.Layout(i % 2, 1 - i % 2, i % 4 < 2) for i in range(args.batch_size)]
    captions = [multi.mix_caption(subjects[l.left].instance_prompt, subjects[l.right].instance_prompt,
                                  l.right_first) for l in layouts]
    captions += [multi.mix_caption("a star", "a star", l.right_first) for l in layouts]
    size = model.image_size // model.latent_factor
    latents = torch.randn(2 * args.batch_size, 4, size, size, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.randint(0, 1000, (len(latents),), generator=generator)
    maps = multi.CrossAttentionMaps(model.unet)
    identifiers = [multi.identifier_pieces(model.text_encoder, s) for s in subjects]
    times = {"without": [], "with": []}
    for repeat in range(args.repeats + 2):          # the first two warm up
        for name in times:
            if name == "with":
                maps.attach()
            else:
                maps.remove()
            seconds = step(model, optimizer, latents, captions, t, noise, identifiers, layouts,
                           maps if name == "with" else None)
            if repeat >= 2:
                times[name].append(seconds)
    without, with_unmix = (statistics.median(times[k]) for k in ("without", "with"))
    print(f"model {args.model}, batch {args.batch_size} cut-mixed + {args.batch_size} prior, "
          f"{args.threads} thread(s), median of {args.repeats} steps (CPU time)")
    print(f"step without unmix {without * 1000:.1f} ms, with unmix {with_unmix * 1000:.1f} ms: "
          f"ratio {with_unmix / without:.3f} (goal <= 1.10)")


if __name__ == "__main__":
    main()

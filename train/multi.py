"""Multi-subject SVDiff: several subjects in one shift file, with Cut-Mix-Unmix (paper sec. 3.3).

Trained jointly, two subjects of one class mix: asked for both, the model draws two half-striped,
half-checkered stars. Cut-Mix-Unmix shows it correctly separated examples instead:

  Cut-Mix. With probability p (--cut-mix-prob), a training example is two different subjects
    side by side: the central half (in width) of a crop of subject A's photo, then the central
    half of one of subject B's, the seam in the middle; sides random. Its prompt names
    both and their sides, in either order:
        "a sks star on the left and a zwx star on the right"
        "a zwx star on the right and a sks star on the left"
    The cut is a crop, not a squeeze: each subject keeps its scale and shape, and a subject in
    the middle half of its photo (where photos of a subject put it) stays whole. It is made on
    pixels, and the new image encoded: cutting VAE latents instead leaves a seam the decoder
    turns into tinted halves wherever the two backgrounds differ (the decoder's attention and
    norms see the whole image). The prior images of each subject's class are
    cut-mixed in the same way, with the class prompts ("a star on the left and a star on the
    right"), so that the prior loss keeps what the base model draws for such prompts.

  Unmix (--unmix-weight w). On a cut-mixed example, each subject's identifier token should look
    at its own half only. With A_l[b, q, k] the cross-attention probabilities of layer l
    (softmax over the 77 tokens k for each image position q, averaged over heads), for each
    cut-mixed example b and each of its two subjects, summed over the identifier's tokens K:
        L_unmix = mean over layers l, examples b, subjects s of
                  mean_{q in the other half} (sum_{k in K_s} A_l[b, q, k])^2
    the paper's MSE toward zero on the non-corresponding region. Every cross-attention layer of
    the UNet takes part, at its own resolution (SD 1.5 at 512: 64, 32, 16 and 8 px maps; the
    bundled tiny model: 8 and 4), the half split at its middle column (a middle column of an
    odd width belongs to neither). The maps are probabilities as softmax makes them, not
    renormalized: a token's share of each position's attention.

The loss of one step, B examples and B prior examples (t, noise per example):
    L = mean_instance ||eps_theta(z_t | c, t) - eps||^2 + lambda * mean_prior ||...||^2 + w * L_unmix
With p = 0 and w = 0 this is train.single's loss on examples drawn from all subjects.

    python -m train.multi          # bundled tiny model: the sks striped star and the zwx checker star
    python -m train.multi --model sd15.safetensors --device cuda \\
        --subject dog/ "photo of a sks dog" "photo of a dog" \\
        --subject sculpture/ "photo of a zwx sculpture" "photo of a sculpture"
    python -m train.multi --concepts-list concepts.json ...   # [{"instance_data_dir": ...,
        "instance_prompt": ..., "class_prompt": ..., "class_data_dir": ... (optional)}, ...]

Sample with phrasings training never used ("a sks dog sitting beside a zwx sculpture"):
    python -m edit.sample --shift runs/multi/spectral_shifts.safetensors --prompt "..."
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from itertools import permutations, product
from pathlib import Path

import torch

from ldm.unet import BasicTransformerBlock
from train import core, data
from train import config as run_config
from train.config import SubjectConfig, option
from train.data import DataError
from train.single import default_class_dir, diffusion_loss, load_class_images, words
from train.toy import subjects as toy
from train.trainable import make_trainable


@dataclass(frozen=True)
class MultiConfig(SubjectConfig):
    subject: tuple[tuple[str, ...], ...] | None = option(
        None, "a subject: its images, its instance prompt (a rare token and the class word: 'a "
        "sks dog') and its class prompt ('a dog'); repeat for each subject. Default: the bundled "
        "model's example subjects, the sks striped star and the zwx checker star",
        metavar=("DIR", "INSTANCE_PROMPT", "CLASS_PROMPT"))
    concepts_list: str | None = option(
        None, "instead of --subject: a JSON list of subjects, each {\"instance_data_dir\", "
        "\"instance_prompt\", \"class_prompt\"} and optionally \"class_data_dir\" (the layout of "
        "Custom Diffusion's and diffusers' concepts lists)", metavar="FILE")
    class_images: str = option("runs/class-images", "prior images are generated into (and reused "
                               "from) a folder here per class prompt and what else shapes them, "
                               "shared with train.single; a concepts list's class_data_dir "
                               "names its subject's folder itself", metavar="DIR")
    cut_mix_prob: float = option(0.6, "share of examples cut-mixed from two subjects, 0 (plain "
                                 "joint training) to below 1", minimum=0, maximum=1)
    unmix_weight: float = option(1.0, "weight of the unmix loss on cut-mixed examples' "
                                 "cross-attention maps; 0 turns it off (and computes nothing)",
                                 minimum=0)
    # each subject is in 80% of the examples at p = 0.6 (two subjects), against train.single's 100%
    steps: int = option(800, "optimizer steps (a resumed run may be given more)", minimum=1,
                        same_on_resume=False)
    output_dir: str = option("runs/multi", "where everything is written", metavar="DIR",
                             same_on_resume=False)


DESCRIPTION = ("Fine-tune the spectral shifts of a Stable Diffusion model on two or more subjects "
               "at once, with Cut-Mix-Unmix and prior preservation. With no arguments: the bundled "
               "tiny model and two example stars (striped 'sks', checkered 'zwx'), minutes on a CPU.")
# the example: two subjects of one class, the paper's hard case; photos with the subject in the
# middle, as photos of a subject are taken (the cut keeps the middle half)
EXAMPLE = (toy.Example("striped_star", "a sks star", "a star"),
           toy.Example("checker_star", "a zwx star", "a star"))
UNSEEN_PAIR_WORDS = ("beside", "next to")   # sample grids: phrasings training never uses


@dataclass(frozen=True)
class Subject:
    images: str
    instance_prompt: str
    class_prompt: str
    class_dir: str | None = None

    @property
    def identifier(self) -> list[str]:
        """The instance prompt's words that the class prompt lacks: 'sks' of 'a sks dog'."""
        return list(dict.fromkeys(w for w in words(self.instance_prompt) if w not in words(self.class_prompt)))


# ----------------------------------------------------------------------------- the subjects

def read_concepts(path: str) -> list[tuple[str, ...]]:
    """A concepts list -> [(images, instance prompt, class prompt[, class dir])]; DataError
    (one line) for a file that is not such a list."""
    what = f"--concepts-list {path}"
    try:
        entries = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{what}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DataError(f"{what}: not a readable JSON file ({reason})") from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{what}: expected a JSON list of objects, one per subject")
    subjects = []
    for i, entry in enumerate(entries, 1):
        keys = ("instance_data_dir", "instance_prompt", "class_prompt")
        missing = [k for k in keys if not isinstance(entry.get(k), str)]
        if missing:
            raise DataError(f"{what}: subject {i} lacks {', '.join(missing)} (text)")
        extra = (entry["class_data_dir"],) if isinstance(entry.get("class_data_dir"), str) else ()
        subjects.append(tuple(entry[k] for k in keys) + extra)
    return subjects


def with_subjects(config: MultiConfig) -> tuple[MultiConfig, bool]:
    """(config with --subject filled in from the concepts list or the example, whether it is
    the example)."""
    if config.subject and config.concepts_list:
        raise DataError("give the subjects with --subject or with --concepts-list, not both")
    if config.concepts_list:
        return dataclasses.replace(config, subject=tuple(read_concepts(config.concepts_list))), False
    if config.subject:
        return config, False
    folder = Path(config.output_dir) / "instance-images"
    return dataclasses.replace(config, subject=tuple(
        (str(folder / e.subject), e.instance_prompt, e.class_prompt) for e in EXAMPLE)), True


def check_settings(config: MultiConfig) -> None:
    """What the flags' ranges cannot say: DataError (one line)."""
    if config.cut_mix_prob == 1:
        raise DataError("--cut-mix-prob 1: with every example cut-mixed the model never sees a "
                        "subject alone, and (the paper found) cannot tell the subjects apart; give "
                        "a value below 1 (default 0.6)")
    if config.cache_latents and config.cut_mix_prob > 0:
        raise DataError("--cache-latents needs --cut-mix-prob 0: cut-mixed images are new every "
                        "step, so they are encoded every step")


def check_subjects(config: MultiConfig) -> None:
    """Two or more subjects, each named by its own identifier next to its class, no identifier
    a word of another subject's prompt (the unmix loss finds a subject's tokens by it):
    DataError (one line) otherwise."""
    subjects = [Subject(*entry) for entry in config.subject]
    if len(subjects) < 2:
        raise DataError(f"{len(subjects)} subject given; train.multi needs two or more (one "
                        "subject: python -m train.single)")
    seen = {}
    for i, s in enumerate(subjects, 1):
        name = f"subject {i} ('{s.instance_prompt}')"
        if not s.instance_prompt.strip() or not s.class_prompt.strip():
            raise DataError(f"{name}: its instance prompt and class prompt must not be empty")
        missing = [w for w in words(s.class_prompt) if w not in words(s.instance_prompt)]
        if missing:
            raise DataError(f"{name} lacks the class word(s) {', '.join(missing)} of its class "
                            f"prompt '{s.class_prompt}'")
        if not s.identifier:
            raise DataError(f"{name} has no token of its own beside its class prompt "
                            f"'{s.class_prompt}': name it with a rare token, as in "
                            f"'a zwx {words(s.class_prompt)[-1]}'")
        for word in s.identifier:
            if word in seen:
                raise DataError(f"{name} uses the token '{word}' of subject {seen[word]}: each "
                                "subject needs its own token")
            seen[word] = i
    for i, s in enumerate(subjects, 1):
        for j, other in enumerate(subjects, 1):
            shared = [w for w in s.identifier if j != i and w in words(other.instance_prompt)]
            if shared:
                raise DataError(f"subject {i}'s token '{shared[0]}' is also a word of subject {j}'s "
                                f"prompt '{other.instance_prompt}': a caption naming both could not "
                                "say which subject it means; give it a rare token of its own")


def resolve(config: MultiConfig, model, fingerprint: str) -> MultiConfig:
    """The model-dependent defaults filled in, and every subject's class folder named (one per
    class prompt, shared with train.single's runs)."""
    filled = {k: v for k, v in core.model_defaults(config, model).items() if getattr(config, k) is None}
    filled["resolution"] = config.resolution or model.image_size
    core.check_resolution(model, filled["resolution"])
    config = dataclasses.replace(config, **filled)
    if config.prior_loss_weight == 0:
        return config
    subjects = [Subject(*entry) for entry in config.subject]
    return dataclasses.replace(config, subject=tuple(
        (s.images, s.instance_prompt, s.class_prompt,
         s.class_dir or default_class_dir(s.class_prompt, config, model, fingerprint, config.class_images))
        for s in subjects))


def read_data(model, config: MultiConfig, subjects: list[Subject], fingerprint: str, example: bool):
    """Each subject's images, and each subject's class images (None without the prior loss)."""
    if example:
        for e, s in zip(EXAMPLE, subjects):
            toy.write_instance_images(e.subject, s.images, positions=("center",))
    what = "--concepts-list instance_data_dir" if config.concepts_list else "--subject"
    instance = [data.ImageSet(data.read_images(s.images, what), config.resolution) for s in subjects]
    if config.prior_loss_weight == 0:
        return instance, None
    prior = {}   # per (folder, prompt): a folder made for another prompt is refused, not reused
    for s in subjects:
        if (s.class_dir, s.class_prompt) not in prior:
            prior[s.class_dir, s.class_prompt] = load_class_images(model, s.class_prompt, s.class_dir,
                                                                   config, fingerprint)
    return instance, [prior[s.class_dir, s.class_prompt] for s in subjects]


# ----------------------------------------------------------------------------- Cut-Mix

def cut_mix(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(..., H, W) twice -> (..., H, W): the central W//2 columns of `left`, then the central
    W - W//2 columns of `right`; the seam at column W//2."""
    width = left.shape[-1]
    return torch.cat([central(left, width // 2), central(right, width - width // 2)], dim=-1)


def central(image: torch.Tensor, columns: int) -> torch.Tensor:
    """The middle `columns` columns of (..., H, W)."""
    start = (image.shape[-1] - columns) // 2
    return image[..., start:start + columns]


def mix_caption(left: str, right: str, right_first: bool) -> str:
    """'<left> on the left and <right> on the right', or the same said right side first."""
    if right_first:
        return f"{right} on the right and {left} on the left"
    return f"{left} on the left and {right} on the right"


@dataclass(frozen=True)
class Layout:
    """What one training example shows: subject `left` alone (right None), or left | right."""
    left: int
    right: int | None = None
    right_first: bool = False   # the caption names the right one first


def draw_examples(count: int, num_subjects: int, cut_mix_prob: float, generator: torch.Generator) -> list[Layout]:
    """`count` examples, each cut-mixed with probability cut_mix_prob from two different
    subjects on random sides, else one subject; subjects drawn uniformly."""
    examples = []
    for _ in range(count):
        mixed, pick, order = torch.rand(3, generator=generator).tolist()
        pair = torch.randperm(num_subjects, generator=generator)[:2].tolist()
        if mixed < cut_mix_prob:
            examples.append(Layout(pair[0], pair[1], order < 0.5))
        else:
            examples.append(Layout(int(pick * num_subjects)))
    return examples


def compose(layouts: list[Layout], image_sets: list[data.ImageSet], prompts: list[str],
            generator: torch.Generator, encode, scale: float) -> tuple[torch.Tensor, list[str]]:
    """The latents (B, 4, h, w) and captions of `layouts`, subject k's images from
    image_sets[k] and prompt prompts[k]. Per subject one draw of as many crops as the layouts
    need (a batch of photos without repeats, as in train.single); cut-mixed in pixels, then all
    encoded at once. Cached latents (--cache-latents, only without cut-mixing) are used as such."""
    needed = [0] * len(image_sets)
    for layout in layouts:
        for k in (layout.left, layout.right):
            if k is not None:
                needed[k] += 1
    if image_sets[0].cache is not None:
        drawn = [iter(s.latents(n, generator, encode, scale)) if n else None
                 for s, n in zip(image_sets, needed)]
        return torch.stack([next(drawn[l.left]) for l in layouts]), [prompts[l.left] for l in layouts]
    drawn = [iter(s.crops(n, generator)) if n else None for s, n in zip(image_sets, needed)]
    pixels, captions = [], []
    for layout in layouts:
        if layout.right is None:
            pixels.append(next(drawn[layout.left]))
            captions.append(prompts[layout.left])
        else:
            pixels.append(cut_mix(next(drawn[layout.left]), next(drawn[layout.right])))
            captions.append(mix_caption(prompts[layout.left], prompts[layout.right], layout.right_first))
    mean, std = encode(torch.stack(pixels))
    return data.posterior_sample(mean.cpu(), std.cpu(), generator, scale), captions


# ----------------------------------------------------------------------------- Unmix

class CrossAttentionMaps:
    """Keeps every cross-attention layer's maps of one forward pass: (B, Lq, 77) each, the
    probabilities averaged over heads, still in the autograd graph.

    It records only while `recording` is True, which a trainer sets for the forward pass alone:
    with gradient checkpointing the blocks run again inside backward, and calls the probe a
    second time there; those calls are ignored, while the maps kept from the forward pass stay
    differentiable (non-reentrant checkpointing recomputes what their gradient needs)."""

    def __init__(self, unet):
        self.maps: list[torch.Tensor] = []
        self.recording = False
        self.layers = [block.attn2 for block in unet.modules() if isinstance(block, BasicTransformerBlock)]
        self.attach()

    def attach(self) -> None:
        """Probe every cross-attention layer (they then run as an explicit softmax)."""
        for layer in self.layers:
            layer.attention_probe = self.record

    def remove(self) -> None:
        """Back to the fused attention kernel everywhere."""
        for layer in self.layers:
            layer.attention_probe = None

    def record(self, module, probs: torch.Tensor) -> None:
        if self.recording:
            self.maps.append(probs.float().mean(dim=1))

    @contextlib.contextmanager
    def forward_pass(self):
        """with maps.forward_pass(): ...  records the maps of that forward pass only."""
        self.maps, self.recording = [], True
        try:
            yield
        finally:
            self.recording = False


def identifier_pieces(text_encoder, subject: Subject) -> list[list[int]]:
    """The token ids of each identifier word ('sks' -> [id of 'sks</w>']; a word the
    vocabulary lacks may be several pieces), found once per run."""
    pieces = []
    for word in subject.identifier:
        ids = text_encoder.tokenize([word])[0].tolist()[1:]       # after <|startoftext|>
        pieces.append(ids[:ids.index(text_encoder.tokenizer.eos_token_id)])
    return pieces


def positions_in(ids: list[int], pieces: list[list[int]]) -> list[int]:
    """Where each word's pieces stand in a tokenized caption (the first place each occurs)."""
    positions = []
    for word in pieces:
        start = next(i for i in range(len(ids) - len(word) + 1) if ids[i:i + len(word)] == word)
        positions += range(start, start + len(word))
    return positions


def check_identifiers_fit(text_encoder, subjects: list[Subject], identifiers) -> None:
    """Every cut-mix caption keeps both identifiers within the text encoder's length (CLIP reads
    77 tokens): DataError (one line) otherwise."""
    for (a, b), right_first in product(permutations(range(len(subjects)), 2), (False, True)):
        caption = mix_caption(subjects[a].instance_prompt, subjects[b].instance_prompt, right_first)
        try:
            positions_in(text_encoder.tokenize([caption])[0].tolist(), identifiers[a] + identifiers[b])
        except StopIteration:
            raise DataError(f"the cut-mix caption '{caption}' is longer than the text encoder's "
                            f"{text_encoder.max_length} tokens and loses a subject's token; "
                            "shorten the instance prompts") from None


def unmix_targets(layouts: list[Layout], token_ids: torch.Tensor,
                  identifiers: list[list[list[int]]]) -> list[tuple[int, list[int], str]]:
    """(example index, token positions of a subject's identifier, the side it must avoid) for
    both subjects of every cut-mixed example; token_ids: the captions tokenized, (>= B, 77);
    identifiers[k]: identifier_pieces of subject k."""
    targets = []
    for b, layout in enumerate(layouts):
        if layout.right is None:
            continue
        ids = token_ids[b].tolist()
        for k, avoid in ((layout.left, "right"), (layout.right, "left")):
            targets.append((b, positions_in(ids, identifiers[k]), avoid))
    return targets


def half_columns(latent_size: tuple[int, int], num_queries: int, right: torch.Tensor):
    """(rows, cols, mask) of a cross-attention map with num_queries = rows * cols positions over
    a latent of size (h, w); mask (*right.shape, cols): True on the columns of the right half
    where `right` is True, of the left half elsewhere (a centre column, if any, is in neither)."""
    h, w = latent_size
    ds = round(math.sqrt(h * w / num_queries))
    rows, cols = h // ds, w // ds
    column, half = torch.arange(cols), cols // 2
    return rows, cols, torch.where(right[..., None], column >= cols - half, column < half)


def unmix_loss(maps: list[torch.Tensor], targets, latent_size: tuple[int, int]) -> torch.Tensor:
    """The mean over layers and targets of the squared attention of a subject's tokens over
    the other subject's half (the module docstring's L_unmix). maps: (B, Lq, 77) per layer,
    Lq = (h/ds) * (w/ds) for the latent size (h, w) and the layer's downsampling ds."""
    examples = torch.tensor([b for b, _, _ in targets])
    tokens = torch.zeros(len(targets), maps[0].shape[-1])       # (T, 77): 1 on the identifier
    for i, (_, positions, _) in enumerate(targets):
        tokens[i, positions] = 1.0
    avoid_right = torch.tensor([avoid == "right" for _, _, avoid in targets])
    per_layer = []
    for attention in maps:
        rows, cols, wrong = half_columns(latent_size, attention.shape[1], avoid_right)   # (T, cols)
        shares = torch.einsum("tqk,tk->tq", attention[examples], tokens.to(attention))   # (T, Lq)
        squared = shares.view(len(targets), rows, cols).pow(2) * wrong[:, None, :].to(shares)
        per_layer.append(squared.sum(dim=(1, 2)) / (rows * (cols // 2)))
    return torch.stack(per_layer).mean()


# ----------------------------------------------------------------------------- the run

def validation_prompts(subjects: list[Subject]) -> list[str]:
    """Sample grid rows: each neighbouring pair together (a phrasing training never used), each
    subject alone, each class prompt (to see drift)."""
    pairs = [f"{a.instance_prompt} {UNSEEN_PAIR_WORDS[i % len(UNSEEN_PAIR_WORDS)]} {b.instance_prompt}"
             for i, (a, b) in enumerate(zip(subjects, subjects[1:]))]
    alone = [s.instance_prompt for s in subjects]
    return pairs + alone + list(dict.fromkeys(s.class_prompt for s in subjects))


def train(config: MultiConfig):
    """Train, save and merge; returns the model with the trained shifts merged in."""
    check_settings(config)
    config, example = with_subjects(config)
    check_subjects(config)
    core.check_output_dir(config)
    model, fingerprint = core.load_model(config)
    config = resolve(config, model, fingerprint)
    subjects = [Subject(*entry) for entry in config.subject]
    identifiers = [identifier_pieces(model.text_encoder, s) for s in subjects]
    if config.unmix_weight > 0:
        check_identifiers_fit(model.text_encoder, subjects, identifiers)
    instance, prior = read_data(model, config, subjects, fingerprint, example)
    encode = core.vae_moments(model)
    if config.cache_latents:
        for images in instance + (prior or []):
            images.build_cache(encode)
    measuring = config.eval_samples and example and core.is_toy_model(model)
    if measuring:   # the base model's class images: what the drift is measured against
        measured = [(e.subject, e.instance_prompt, e.class_prompt) for e in EXAMPLE]
        base_readings = toy.base_class_readings(model, measured, config.eval_samples,
                                                config.sample_steps, config.guidance, config.seed + 1)
    trainable = make_trainable(model, config)
    maps = CrossAttentionMaps(model.unet) if config.unmix_weight > 0 else None
    B, device, scale = config.batch_size, model.device, model.vae.config.scale_factor
    latent_size = (config.resolution // model.latent_factor,) * 2
    metadata = {"subjects": json.dumps([dataclasses.asdict(s) for s in subjects])}

    with core.Run(config, model, trainable, fingerprint, metadata,
                  log_fields=("loss", "instance_loss", "prior_loss", "unmix_loss", "cut_mixed"),
                  validation_prompts=validation_prompts(subjects)) as run:
        for step in run.steps():
            generator = data.step_generator(config.seed, step)
            examples = draw_examples(B, len(subjects), config.cut_mix_prob, generator)
            latents, captions = compose(examples, instance, [s.instance_prompt for s in subjects],
                                        generator, encode, scale)
            if prior is not None:  # the same layout from the class images, with the class prompts
                prior_latents, prior_captions = compose(examples, prior, [s.class_prompt for s in subjects],
                                                        generator, encode, scale)
                latents, captions = torch.cat([latents, prior_latents]), captions + prior_captions
            t = torch.randint(0, model.schedule.num_train_timesteps, (len(latents),), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            token_ids = model.text_encoder.tokenize(captions)
            targets = unmix_targets(examples, token_ids, identifiers) if maps is not None else []
            recording = maps.forward_pass() if targets else contextlib.nullcontext()
            with core.autocast(config, device), recording:
                context = model.text_encoder(token_ids.to(device))
                per_sample = diffusion_loss(model, latents.to(device), context, t.to(device), noise.to(device))
            instance_loss = per_sample[:B].mean()
            prior_loss = per_sample[B:].mean() if prior is not None else torch.zeros(())
            unmix = unmix_loss(maps.maps, targets, latent_size) if targets else torch.zeros(())
            loss = instance_loss + config.prior_loss_weight * prior_loss + config.unmix_weight * unmix
            run.step(step, loss, instance_loss=instance_loss, prior_loss=prior_loss, unmix_loss=unmix,
                     cut_mixed=torch.tensor(sum(e.right is not None for e in examples)))
        run.finish()
    if maps is not None:
        maps.remove()

    if measuring:
        table = toy.measure_subjects(model, measured, config.eval_samples, config.sample_steps,
                                     config.guidance, config.seed + 1, base_readings)
        print(toy.format_subjects(table, config.eval_samples))
    return model


def build_parser():
    return run_config.build_parser(MultiConfig, "python -m train.multi", DESCRIPTION)


def parse_args(argv=None) -> MultiConfig:
    return run_config.parse(build_parser(), MultiConfig, argv)


def main(argv=None) -> int:
    return core.main(train, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

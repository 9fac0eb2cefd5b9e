"""
The offline stand-in models of opd.py: nothing is downloaded, the classes are SD3.5-Medium's.

  tiny          an SD3 pipeline built from configs (~0.1M-parameter transformer, 32 px images),
                pretrained once for ~2 min on synthetic captioned images and cached, for toy
                tasks whose rewards need no model: color, position, jpeg (three tasks that
                pull the same way: the control)
  tiny-conflict the same, pretrained on captions that also say vivid and faded, for the tasks
                vivid, faded (two that oppose) and exact (a sparse one). A second model, not
                the first one's recipe extended: the tiny model's grasp of left and right is
                fragile (several extended recipes left the base's position reward near 0,
                where the first one's is 0.54), and its tables stay comparable.
  sd35m-random  SD3.5-Medium's transformer (its published config, ~2.5B parameters) with random
                weights and tiny text encoders of the real widths: speed and memory of the real
                transformer with nothing downloaded.

Their numbers show that the machinery works, not what SD3.5 reaches.
"""
import os
import time

import torch

from opd_support.options import UserError

TOY_ADJECTIVES = ("plain", "simple", "smooth", "clean")
TOY_MODELS = ("tiny", "tiny-conflict")
RECIPES = {"tiny": "tiny-v4", "tiny-conflict": "tiny-conflict-v1"}  # bump when build_offline,
# toy_images or pretrain_tiny change what a model is; the name of its cached weights
FORMS = {  # the caption forms of each model's pretraining images, drawn uniformly
    "tiny": ["{c} {s}", "bright {s} on the {side}", "{adj} picture of a {s}",
             "{c} {s} on the {side}", ""],
    "tiny-conflict": ["{c} {s}", "vivid {c} {s}", "faded {c} {s}",
                      "pale washed out picture of a {c} {s}", ""]}
WORDS = ["a", "bright", "on", "the", "picture", "of"]  # besides colours, sides, subjects, ...
CONFLICT_WORDS = ["vivid", "faded", "pale", "washed", "out"]  # tiny-conflict's too
FADED = {"word": "a faded {c} {s}",  # --toy_wording: one word apart from vivid's prompts,
         "template": "a pale washed out picture of a {c} {s}",  # or another template,
         "shared": "a {c} {s}"}  # or exact's own prompts: grey and the pure colour both asked


def toy_prompts(name, wording="word"):
    """The toy tasks' prompts, generated, and a fixed split: (train, validation, test), every
    4th prompt a test prompt and every 4th from the third a validation prompt (a quarter each:
    an eighth left one hard-coloured handful to validate the sparse task on)."""
    from rewards import CHROMATIC, COLORS, SUBJECTS
    if name in ("color", "exact"):
        ps = [f"a {c} {s}" for c in COLORS for s in SUBJECTS]
    elif name == "position":  # left/right only: with top/bottom too, a teacher traded one for
                              # the other
        ps = [f"a {w} {s} on the {side}" for side in ("left", "right") for s in SUBJECTS
              for w in ("bright", "red", "green", "blue")]
    elif name == "vivid":
        ps = [f"a vivid {c} {s}" for c in CHROMATIC for s in SUBJECTS]
    elif name == "faded":
        ps = [FADED[wording].format(c=c, s=s) for c in CHROMATIC for s in SUBJECTS]
    else:
        ps = [f"a {adj} picture of a {s}" for adj in TOY_ADJECTIVES for s in SUBJECTS]
    return ([p for i, p in enumerate(ps) if i % 2], ps[2::4], ps[::4])


def toy_tokenizer(kind="tiny"):
    """A real CLIPTokenizer without files: a byte-level vocab (2 specials, 256 byte chars, the
    same with </w>) plus BPE merges that make each word of the toy prompts one token, as a
    trained CLIP vocab does for common words ('left' and 'right' are then not mostly the same
    bytes); tiny-conflict's knows its words too."""
    from transformers import CLIPTokenizer
    from rewards import COLORS, SIDES, SUBJECTS
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in bs] + [chr(256 + n) for n in range(256 - len(bs))]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ["", "</w>"]:
        for c in chars:
            vocab[c + suffix] = len(vocab)
    merges = []
    words = [*COLORS, *SIDES, *SUBJECTS, *TOY_ADJECTIVES, *WORDS,
             *(CONFLICT_WORDS if kind == "tiny-conflict" else [])]
    for w in sorted(words, key=len, reverse=True):  # longer first: 'bright' must not end in 'right'
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in merges:
                merges.append((cur, nxt))
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    for w in words:  # a word whose pieces repeat ('vivid': vi vi d) needs merges of its own
        while len(pieces := tok.tokenize(w)) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return tok


# stabilityai/stable-diffusion-3.5-medium transformer/config.json
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
    caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")


def build_offline(kind, seed=0):
    """A StableDiffusion3Pipeline with random weights, built from configs (nothing downloaded).
    kind 'tiny': ~0.1M-param transformer, 2x-downsampling VAE (runs on CPU in seconds).
    kind 'sd35m-random': SD3.5-Medium's published transformer config (~2.5B params) with tiny
    text encoders of the real widths and a tiny VAE: speed and memory of the real transformer."""
    from opd_support.machinery import quiet_hf
    quiet_hf()
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = toy_tokenizer(kind)
    if kind in TOY_MODELS:
        widths, tcfg = [(32, 32), (32, 32)], dict(
            sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,
            dual_attention_layers=(0,), qk_norm="rms_norm")
        blocks, vae_ch = 2, 16
    else:
        widths, tcfg = [(64, 768), (64, 1280)], SD35M_TRANSFORMER
        blocks, vae_ch = 4, 16  # VAE scale factor 8 as the real one
    encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=p, bos_token_id=0,
        eos_token_id=1, pad_token_id=1, dropout=0.0, attention_dropout=0.0)).eval()
        for h, p in widths]
    vae = AutoencoderKL(in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks,
                        block_out_channels=(vae_ch,) * blocks,
                        layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=32,
                        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                        use_post_quant_conv=False).eval()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**tcfg).eval(), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=encoders[0],
        tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=tok, text_encoder_3=None,
        tokenizer_3=None)


def toy_images(n, g, kind="tiny"):
    """n captioned 32x32 images for pretraining the tiny model: a flat background that is half
    the colour the caption names (vivid: 80%, its rest a random colour; faded: 25%, its rest a
    grey), the side it names brighter, a little pixel noise. The toy tasks ask for more than
    this data shows (the pure colour, a strong contrast, no noise, no colour at all)."""
    from rewards import COLORS, SIDES, SUBJECTS
    u = lambda: torch.rand((), generator=g).item()
    pick = lambda xs: xs[int(u() * len(xs))]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    ramp = {"left": -xx, "right": xx, "top": -yy, "bottom": yy}
    ims, caps = [], []
    for _ in range(n):
        c, s, side, adj = pick(list(COLORS)), pick(SUBJECTS), pick(SIDES), pick(TOY_ADJECTIVES)
        form = pick(FORMS[kind])
        caps.append(("a " + form.format(c=c, s=s, side=side, adj=adj)) if form else "")
        col = torch.tensor(COLORS[c] if "{c}" in form else [u(), u(), u()], dtype=torch.float32)
        share = 0.8 if "vivid" in form else 0.25 if "faded" in form or "pale" in form else 0.5
        rest = 0.2 + 0.6 * torch.rand(3 if share > 0.25 else 1, 1, 1, generator=g)
        im = (1 - share) * rest.expand(3, 1, 1) + share * col.view(3, 1, 1)
        im = im + (0.4 if "{side}" in form else 0.1 * u()) * ramp[side]
        ims.append((im + 0.05 * torch.randn(3, 32, 32, generator=g)).clamp(0, 1))
    return torch.stack(ims), caps


def pretrain_tiny(pipe, kind="tiny", vae_steps=150, steps=500, seed=0):
    """About 2 min on 2 CPU cores: the VAE as an autoencoder on toy_images, its latent scale and
    shift from data, then the transformer and both CLIP text encoders together by flow matching
    (v = eps - x0, logit-normal t, 10% empty captions for CFG). Without this, a random tiny SD3
    barely reacts to its prompt (1% of the velocity between 'left' and 'right') and its VAE
    cannot change an image's mean colour; with the text encoders frozen at random, 500 steps
    teach colour but not the side (a position reward of 0.04 against 0.44 when they train)."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    vae, tr, encoders = pipe.vae, pipe.transformer, [pipe.text_encoder, pipe.text_encoder_2]
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(vae_steps):
        x = toy_images(32, g, kind)[0] * 2 - 1
        z = vae.encode(x).latent_dist.mean
        loss = (F.mse_loss(vae.decode(z + 0.1 * torch.randn(z.shape, generator=g)).sample, x) +
                1e-4 * z.pow(2).mean())
        opt.zero_grad(); loss.backward(); opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = vae.encode(toy_images(256, g, kind)[0] * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1 / z.std().item())
    models = [tr, *encoders]
    params = [p for mod in models for p in mod.parameters()]
    for mod in models:
        mod.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    for _ in range(steps):
        ims, caps = toy_images(64, g, kind)
        caps = [c if keep else ""
                for c, keep in zip(caps, (torch.rand(64, generator=g) > 0.1).tolist())]
        uniq = list(dict.fromkeys(caps))
        e, _, p, _ = pipe.encode_prompt(uniq, None, None, device="cpu",
                                        do_classifier_free_guidance=False,
                                        max_sequence_length=8)  # with grad: the encoders learn too
        row = {c: i for i, c in enumerate(uniq)}
        pick = torch.tensor([row[c] for c in caps])
        with torch.no_grad():
            x0 = ((vae.encode(ims * 2 - 1).latent_dist.mean - vae.config.shift_factor) *
                  vae.config.scaling_factor)
        t = torch.sigmoid(torch.randn(64, generator=g)).view(-1, 1, 1, 1)
        eps = torch.randn(x0.shape, generator=g)
        v = tr(hidden_states=(1 - t) * x0 + t * eps, timestep=t.flatten() * 1000,
               encoder_hidden_states=e[pick], pooled_projections=p[pick], return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for mod in models:
        mod.eval().requires_grad_(False)
    return loss.item()


def tiny_pipeline(kind="tiny", rank=0, world=1):
    """A toy model (tiny, tiny-conflict): build_offline(kind) pretrained once by pretrain_tiny,
    then cached as safetensors (in $OPD_CACHE, default ~/.cache/diffusion-opd) and loaded by
    every later run and every rank, so all of them use the same weights. A cached file that
    cannot be used (cut short, another file, NaN weights, ...) is built again, with one line."""
    from safetensors.torch import save_file
    cache = (os.environ.get("OPD_CACHE")
             or os.path.join(os.path.expanduser("~"), ".cache", "diffusion-opd"))
    path = os.path.join(cache, RECIPES[kind] + ".safetensors")
    pipe = build_offline(kind)
    why = load_cached(pipe, path) if rank == 0 and os.path.isfile(path) else None
    if rank == 0 and (why or not os.path.isfile(path)):
        if why:
            print(f"warning: the cached {kind} model is unusable ({why}): built again",
                  flush=True)
            pipe = build_offline(kind)  # from its random start, as a first build
        print(f"pretraining the {kind} model once (~2 min), cached at {path}", flush=True)
        t0 = time.time()
        with torch.random.fork_rng():
            loss = pretrain_tiny(pipe, kind)
        state = {f"{k}.{n}": v.detach().contiguous() for k, mod in parts_of(pipe).items()
                 for n, v in mod.state_dict().items()}
        meta = {"scaling_factor": str(pipe.vae.config.scaling_factor),
                "shift_factor": str(pipe.vae.config.shift_factor)}
        os.makedirs(cache, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
        print(f"{kind} model pretrained in {time.time() - t0:.0f}s (flow-matching loss {loss:.3f})",
              flush=True)
        why = load_cached(pipe, path)  # every rank loads the same file
    if world > 1:
        torch.distributed.barrier()
    if rank or why:  # other ranks: rank 0 checked the file; rank 0: the file it just wrote
        why = load_cached(pipe, path)
    if why:
        raise UserError(f"the cached {kind} model {path} cannot be used ({why})")
    return pipe


def parts_of(pipe):
    return {"transformer": pipe.transformer, "vae": pipe.vae, "te1": pipe.text_encoder,
            "te2": pipe.text_encoder_2}


def load_cached(pipe, path):
    """Load the cached weights into the pipeline; None, or why the file cannot be used (then
    the pipeline may be half loaded): not a whole safetensors file, a tensor missing, extra, of
    another shape or dtype, non-finite values, or no usable VAE scale and shift."""
    from opd_support.checkpoints import first_line, read_weights
    try:
        state, meta = read_weights(path)
        for k, mod in parts_of(pipe).items():
            mine = mod.state_dict()
            theirs = {n[len(k) + 1:]: v for n, v in state.items() if n.startswith(k + ".")}
            wrong = [n for n in mine if n in theirs and theirs[n].dtype != mine[n].dtype]
            if wrong:
                return f"{k}.{wrong[0]} is {theirs[wrong[0]].dtype}, not {mine[wrong[0]].dtype}"
            mod.load_state_dict(theirs)  # strict: a missing, extra or reshaped tensor raises
        if len(state) != sum(len(mod.state_dict()) for mod in parts_of(pipe).values()):
            return "it holds tensors of no part of the model"
        scale, shift = float(meta["scaling_factor"]), float(meta["shift_factor"])
        if not (0 < scale < float("inf") and abs(shift) < float("inf")):
            return f"its VAE scale and shift are {scale} and {shift}"
    except UserError as e:
        return str(e)
    except (RuntimeError, KeyError, ValueError) as e:
        return first_line(e)
    pipe.vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    return None

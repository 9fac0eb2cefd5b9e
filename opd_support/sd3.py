"""
The SD3 pipeline as opd.py's maths needs it: the sampler's times (diffusers' schedule), loading
(a hub id or folder through diffusers' StableDiffusion3Pipeline.from_pretrained, or tiny.py's
offline stand-ins), velocity closures v(x, t) with classifier-free guidance for any LoRA
adapter, a bounded cache of prompt embeddings, latent noise and decoding; adding and dropping
LoRA adapters (peft).
"""
import collections
import contextlib
import warnings

import torch

from opd_support.machinery import quiet_hf
from opd_support.options import UserError


def sd3_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """The sampler's times 1 = t_0 > ... > t_N = 0 of diffusers' FlowMatchEulerDiscreteScheduler
    (SD3: shift 3.0, no dynamic shifting). Returns (N + 1,) float32."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)
    t_min = shifted(1.0 / num_train_timesteps)  # the scheduler's smallest training time
    # evenly spaced in the already shifted range, then shifted once more, as diffusers does
    t = shifted(torch.linspace(1.0, t_min, num_steps, dtype=torch.float64))
    return torch.cat([t, t.new_zeros(1)]).float()


def load_pipeline(cfg, device, rank=0, world=1):
    """The pipeline named by --model: fp32 on CPU, bf16 on GPU. The transformer and the VAE go
    to the device; the text encoders too only with --text_encoders gpu (else they stay in host
    memory and visit the GPU to encode, see SD3.encode). --no_t5 loads no T5."""
    from opd_support import tiny
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if cfg.model in (*tiny.TOY_MODELS, "sd35m-random"):
        pipe = tiny.tiny_pipeline(cfg.model, rank, world) if cfg.model in tiny.TOY_MODELS else \
            tiny.build_offline(cfg.model)
    else:
        quiet_hf()
        from diffusers import StableDiffusion3Pipeline
        no_t5 = dict(text_encoder_3=None, tokenizer_3=None) if cfg.no_t5 else {}
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype
                warnings.simplefilter("ignore", FutureWarning)
                pipe = StableDiffusion3Pipeline.from_pretrained(cfg.model, torch_dtype=dtype,
                                                                **no_t5)
        except Exception as e:  # offline and not cached, bad folder, gated repo, ...
            raise UserError(f"cannot load model {cfg.model!r} ({type(e).__name__}): download it "
                            f"once with network access (huggingface-cli download {cfg.model}) or "
                            f"pass a local folder holding a StableDiffusion3Pipeline") from None
    pipe.set_progress_bar_config(disable=True)
    encoders_to = device if cfg.text_encoders == "gpu" else torch.device("cpu")
    for mod in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2,
                pipe.text_encoder_3):
        if mod is not None:
            on_device = mod in (pipe.transformer, pipe.vae)
            mod.requires_grad_(False).eval().to(device if on_device else encoders_to, dtype)
    return pipe


class SD3:
    """The pipeline's pieces as the maths needs them: prompt embeddings (computed when first
    needed, kept in a least-recently-used cache of at most --embed_cache_mb), velocity closures
    (CFG included) for any adapter, latent noise and decoding to images."""

    def __init__(self, pipe, cfg, device):
        self.pipe, self.cfg, self.device = pipe, cfg, device
        self.tr = pipe.transformer
        self.dtype = self.tr.dtype
        self.cache, self.cache_bytes = collections.OrderedDict(), 0  # prompt -> (emb, pooled), CPU
        self.active, self.layers, self.layers_key = "?", [], None
        self.trainable = []  # the adapter weights being trained
        # transformer rows (one image, one CFG half) run with and without grad: a run's compute
        # (runs.start_run sets it to the run's own count; validation leaves it unchanged)
        self.passes = {"grad": 0, "nograd": 0}
        side = cfg.resolution // pipe.vae_scale_factor
        self.latent = (self.tr.config.in_channels, side, side)
        if cfg.grad_checkpointing:
            self.tr.enable_gradient_checkpointing()

    def encode(self, prompts, batch=64):
        """Embed the prompts not in the cache, then drop the least recently used others until
        the cache holds at most --embed_cache_mb (the prompts asked for now always stay). With
        --text_encoders offload on a GPU, the encoders visit it for this call only."""
        need = list(dict.fromkeys([""] + list(prompts)))
        todo = [p for p in need if p not in self.cache]
        encoders = [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2,
                                self.pipe.text_encoder_3) if e is not None]
        visit = todo and self.device.type == "cuda" and self.cfg.text_encoders == "offload"
        where = self.device if self.cfg.text_encoders != "cpu" else torch.device("cpu")
        for e in encoders if visit else []:
            e.to(self.device)
        with torch.no_grad():
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                emb, _, pooled, _ = self.pipe.encode_prompt(
                    chunk, None, None, device=where, do_classifier_free_guidance=False,
                    max_sequence_length=self.cfg.max_seq_len)
                for p, e, q in zip(chunk, emb.cpu(), pooled.cpu()):
                    self.cache[p] = (e.clone(), q.clone())
                    self.cache_bytes += e.nbytes + q.nbytes
        if visit:
            for e in encoders:
                e.to("cpu")
            torch.cuda.empty_cache()
        for p in need:
            self.cache.move_to_end(p)
        limit, keep = self.cfg.embed_cache_mb * 2**20, set(need)
        while self.cache_bytes > limit and next(iter(self.cache)) not in keep:
            e, q = self.cache.popitem(last=False)[1]
            self.cache_bytes -= e.nbytes + q.nbytes

    def prompt_bytes(self):
        """Host bytes of one cached prompt's embeddings."""
        self.encode([])
        return sum(x.nbytes for x in self.cache[""])

    def use(self, adapter):
        """Make an adapter active (None = the base model) on every LoRA layer, setting peft's
        per-layer fields directly (peft's set_adapter would also walk every weight to make the
        active adapter trainable); only self.trainable requires grad, set when it or the adapters
        change. (A leaf that stops requiring grad between forward and backward gets no grad.)"""
        if adapter == self.active:
            return
        from peft.tuners.tuners_utils import BaseTunerLayer
        key = (tuple(getattr(self.tr, "peft_config", {})), tuple(map(id, self.trainable)))
        if key != self.layers_key:
            self.layers = [mod for mod in self.tr.modules() if isinstance(mod, BaseTunerLayer)]
            for n, p in self.tr.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(False)
            for p in self.trainable:
                p.requires_grad_(True)
            self.layers_key = key
        for layer in self.layers:
            layer._disable_adapters = adapter is None
            if adapter is not None:
                layer._active_adapter = [adapter]
        self.active = adapter

    def velocity(self, adapter, prompts, guidance):
        """velocity(x, t) of the model with this adapter on these prompts, CFG with the empty
        negative prompt: v = v_u + w (v_c - v_u)."""
        self.encode(prompts)
        emb = torch.stack([self.cache[p][0] for p in prompts]).to(self.device)   # (B, L, D)
        pooled = torch.stack([self.cache[p][1] for p in prompts]).to(self.device)  # (B, P)
        if guidance != 1:
            ne, npool = self.cache[""]
            emb = torch.cat([ne.to(self.device).expand_as(emb), emb])  # (2B, L, D) [uncond; cond]
            pooled = torch.cat([npool.to(self.device).expand_as(pooled), pooled])
        emb, pooled = emb.to(self.dtype), pooled.to(self.dtype)
        autocast = (torch.autocast("cuda", torch.bfloat16) if self.device.type == "cuda"
                    else contextlib.nullcontext())

        def v(x, t):
            self.use(adapter)
            xin = torch.cat([x, x]) if guidance != 1 else x
            tt = torch.as_tensor(t, dtype=torch.float32).reshape(-1) * 1000  # () or (B,) times
            tt = (torch.cat([tt, tt]) if guidance != 1 and len(tt) > 1 else tt).to(self.device)
            tt = tt.expand(len(xin))
            self.passes["grad" if torch.is_grad_enabled() else "nograd"] += len(xin)
            with autocast:  # the transformer's timestep input is 1000 t
                out = self.tr(hidden_states=xin.to(self.dtype), timestep=tt,
                              encoder_hidden_states=emb, pooled_projections=pooled,
                              return_dict=False)[0].float()
            if guidance == 1:
                return out
            vu, vc = out.chunk(2)
            return vu + guidance * (vc - vu)
        return v

    def noise(self, n, generator):
        """x at t = 1: (n, C, h, w) standard normal latents, drawn on CPU for reproducibility."""
        return torch.randn((n, *self.latent), generator=generator).to(self.device)

    @torch.no_grad()
    def decode(self, x, batch=16):
        """Latents -> images (B, 3, H, W) in [0, 1], fp32."""
        vae, out = self.pipe.vae, []
        for i in range(0, len(x), batch):
            z = x[i:i + batch] / vae.config.scaling_factor + vae.config.shift_factor
            out.append((vae.decode(z.to(vae.dtype)).sample.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)


def add_lora(tr, name, cfg):
    """A LoRA adapter (r, alpha, targets; B = 0 so it starts at the base), active, its weights
    fp32 and trainable; a target that names no module is refused (peft would ignore it)."""
    from peft import LoraConfig
    torch.manual_seed(cfg.seed)  # A's init
    targets = [t for t in cfg.lora_targets.split(",") if t]
    modules = [n for n, _ in tr.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        raise UserError(f"--lora_targets: no module of the transformer is named "
                        f"{', '.join(map(repr, missing))}")
    tr.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights=True,
                              target_modules=targets), adapter_name=name)
    tr.set_adapter(name)
    params = [p for p in tr.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    for mod in tr.modules():  # peft's fp32 cast of each input would store a bf16 copy of it too
        if hasattr(mod, "cast_input_dtype_enabled"):
            mod.cast_input_dtype_enabled = False
    return params


def drop_adapters(m):
    if getattr(m.tr, "peft_config", None):
        with warnings.catch_warnings():  # peft names the adapter it activates in between
            warnings.simplefilter("ignore")
            m.tr.delete_adapters(list(m.tr.peft_config))
    m.active, m.trainable = "?", []

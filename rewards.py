"""
Rewards for DiffusionOPD: one interface for every reward.

    fn = rewards.load("color")                 # a name, or a weighted mix
                                               # "pickscore:1,clipscore:1,hpsv2:1"
    r = fn(images, prompts, metadata=None)     # images (B, 3, H, W) in [0, 1] -> (B,) float tensor
    python rewards.py --list                   # the registry, with what each needs

Weight-free rewards (work anywhere; the toy ones are used by the tiny default model):
  color, position, jpeg (toy tasks), vivid, faded, exact (toy tasks that conflict: the
  saturation of the mean colour, its opposite, and a sparse 0/1 success on the named colour),
  jpeg_compressibility, jpeg_incompressibility (DDPO).
Model-based rewards (loaded lazily on the first call, once; no grad; batched):
  ocr          rapidocr-onnxruntime: its PP-OCR models ship in the wheel, so it works offline.
  pickscore    PickScore_v1 (CLIP-H): exp(logit_scale) * cos(image, text) / 26   (Flow-GRPO's scale)
  clipscore    CLIP ViT-L/14:         exp(logit_scale) * cos(image, text) / 30   (Flow-GRPO's scale)
  hpsv2        HPSv2.1 (CLIP-H):      cos(image, text)  (about 0.2-0.35)
  aesthetic    LAION aesthetic predictor v2: an MLP on the normalised CLIP ViT-L/14 image
               embedding, the raw score (about 1-10; DDPO and Flow-GRPO use it unscaled)
  imagereward  ImageReward-v1.0: its checkpoint loaded into transformers' BLIP (no package needed)
  geneval      GenEval's verdict (0/1) over a COCO Mask2Former (transformers) and CLIP colours
  geneval_partial  Flow-GRPO's partial GenEval score (per clause: count, colour, position)
Weights come from the Hugging Face hub or its local cache (from_pretrained). Offline and not
cached, the first call stops with one line naming the model id. Another model or a local folder:
"name=ID_OR_DIR" in the spec, e.g. "pickscore=/data/PickScore_v1:1,clipscore:1".
"""
import io
import os
import re
import sys

import torch

class RewardError(RuntimeError):
    """A reward's model or package is not available: one line that says how to get it."""


def _package(name, module, pip):
    """An optional package a reward needs, imported on first use, or one line saying how to get
    it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:  # the cause may be the package's own import of another one
        raise RewardError(f"the {name!r} reward needs {module}, whose import failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:160]}): "
                          f"pip install {pip}") from None


# ---------------------------------------------------------------------------- toy (tiny model)
COLORS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
          "cyan": (0, 1, 1), "magenta": (1, 0, 1), "white": (1, 1, 1), "black": (0, 0, 0)}
SIDES = ["left", "right", "top", "bottom"]
SUBJECTS = ["cat", "dog", "car", "house", "flower", "bird"]


def _word(prompt, words, what):
    found = [w for w in words if re.search(rf"\b{w}\b", prompt.lower())]
    if not found:
        raise ValueError(f"the prompt {prompt!r} names no {what} (one of {', '.join(words)})")
    return found[0]


def color(images, prompts, metadata=None):
    """1 - distance between the image's mean colour and the colour the prompt names, / sqrt(3)."""
    target = torch.tensor([COLORS[_word(p, COLORS, "colour")] for p in prompts],
                          dtype=torch.float32)
    return 1 - (images.float().mean((2, 3)) - target.to(images.device)).norm(dim=1) / 3**0.5


def position(images, prompts, metadata=None):
    """Brightness of the side the prompt names minus that of the opposite side, in [-1, 1]."""
    g = images.float().mean(1)  # (B, H, W) grey
    H, W = g.shape[1:]
    halves = {"left": g[:, :, : W // 2], "right": g[:, :, W - W // 2:],
              "top": g[:, : H // 2], "bottom": g[:, H - H // 2:]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    sides = [_word(p, SIDES, "side") for p in prompts]
    return torch.stack([halves[s][i].mean() - halves[opposite[s]][i].mean()
                        for i, s in enumerate(sides)])


CHROMATIC = ["red", "green", "blue", "yellow", "cyan", "magenta"]  # the colours with a hue
EXACT_TOL = 0.15  # exact: the mean colour within this RGB distance of the named colour


def saturation(images):
    """The saturation of each image's mean colour, max - min of its mean R, G, B, in [0, 1]:
    pixel noise averages out, so only the image's overall colour counts."""
    m = images.float().mean((2, 3))  # (B, 3)
    return m.max(1).values - m.min(1).values


def vivid(images, prompts=None, metadata=None):
    """Toy conflict task: the saturation of the mean colour (1: a pure hue)."""
    return saturation(images)


def faded(images, prompts=None, metadata=None):
    """Toy conflict task: 1 - the saturation of the mean colour (1: grey), vivid's opposite."""
    return 1 - saturation(images)


def exact(images, prompts, metadata=None):
    """Toy sparse task: 1 when the image's mean colour lies within EXACT_TOL (RGB distance) of
    the colour the prompt names, else 0."""
    target = torch.tensor([COLORS[_word(p, COLORS, "colour")] for p in prompts],
                          dtype=torch.float32)
    dist = (images.float().mean((2, 3)) - target.to(images.device)).norm(dim=1)
    return (dist < EXACT_TOL).float()


def uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 numpy, as PIL and OCR engines want it."""
    return (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _jpeg_kb(images, quality=95):
    from PIL import Image
    out = []
    for im in uint8(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(buf.tell() / 1000)
    return torch.tensor(out)


def jpeg_compressibility(images, prompts=None, metadata=None):
    """DDPO: minus the JPEG size (quality 95) in kB."""
    return -_jpeg_kb(images).to(images.device)


def jpeg_incompressibility(images, prompts=None, metadata=None):
    """DDPO: the JPEG size (quality 95) in kB."""
    return _jpeg_kb(images).to(images.device)


# ---------------------------------------------------------------------------- OCR
def _levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_target(prompt):
    """The text to render: the first span in straight double quotes (Flow-GRPO's rule), else in
    curly double quotes, else in single quotes that are not apostrophes (so "a bird's-eye view of
    a tower's top" has none)."""
    for quoted in (r'"([^"]+)"', r"\u201c([^\u201d]+)\u201d", r"(?<!\w)'([^']+)'(?!\w)"):
        m = re.search(quoted, prompt)
        if m:
            return m.group(1)
    raise ValueError(f"the OCR prompt {prompt!r} has no quoted text to render")


def ocr_score(read, target):
    """Flow-GRPO's OCR reward on lower-cased text without spaces: 1 when the target appears
    inside the text read, else 1 - min(1, Levenshtein(read, target) / len(target))."""
    norm = lambda s: re.sub(r"\s+", "", s.lower())
    read, target = norm(read), norm(target)
    if target in read:
        return 1.0
    return 1 - min(1.0, _levenshtein(read, target) / max(1, len(target)))


class OCR:
    """Flow-GRPO's OCR reward (ocr_score) on all the text rapidocr reads (PP-OCRv4 models, as
    Flow-GRPO's PaddleOCR), joined."""

    def __init__(self, device="cpu"):
        self.engine = None

    def load(self):
        if self.engine is None:
            self.engine = _package("ocr", "rapidocr_onnxruntime", "rapidocr-onnxruntime").RapidOCR()
        return self

    def __call__(self, images, prompts, metadata=None):
        self.load()
        out = []
        for im, p in zip(uint8(images), prompts):
            result, _ = self.engine(im[..., ::-1].copy())  # RapidOCR takes BGR arrays
            out.append(ocr_score("".join(r[1] for r in result or []), ocr_target(p)))
        return torch.tensor(out, device=images.device)


# ---------------------------------------------------------------------------- model-based: loading
_SHARED = {}  # loaded models, shared by the rewards that use the same one


def _load(name, model_id, fn):
    """fn() loads model_id from the hub or its cache; any failure becomes one RewardError line."""
    try:
        return fn()
    except RewardError:
        raise
    except Exception as e:  # offline and not cached, gated, bad folder, ...
        raise RewardError(f"reward {name!r} cannot load {model_id!r} ({type(e).__name__}): "
                          f"download it once with network access (it is then cached), "
                          f"or pass a local folder as {name}=DIR in the reward spec") from None


def quiet():
    """transformers: errors only (its image processors warn that torchvision is absent)."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _hub_file(name, repo, filename):
    """A single weight file: a local path, or downloaded from (or found in the cache of) a hub
    repo."""
    if os.path.isfile(repo):
        return repo
    if os.path.isdir(repo):
        return os.path.join(repo, filename)
    from huggingface_hub import hf_hub_download
    return _load(name, f"{repo}/{filename}", lambda: hf_hub_download(repo, filename))


def clip_pixels(images, size, mean, std):
    """CLIP preprocessing on a tensor batch (B, 3, H, W) in [0, 1]: bicubic resize of the short
    side to size, centre crop, normalise (the CLIPImageProcessor steps, without a PIL round
    trip)."""
    import torch.nn.functional as F
    h, w = images.shape[-2:]
    s = size / min(h, w)
    x = F.interpolate(images.float(), size=(max(size, round(h * s)), max(size, round(w * s))),
                      mode="bicubic", align_corners=False, antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


def openclip_to_hf(sd):
    """An open_clip CLIP state dict (as HPSv2 ships it) in the names of transformers' CLIPModel:
    fused attention in-projections split into q, k, v; x @ proj matrices become Linear weights."""
    out = {}
    names = [(r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
             (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
             (r"^visual\.positional_embedding$",
              "vision_model.embeddings.position_embedding.weight"),
             (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
             (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
             (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
             (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
             (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
             (r"^ln_final\.", "text_model.final_layer_norm."),
             (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
             (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
             (r"\.mlp\.c_fc\.", ".mlp.fc1."), (r"\.mlp\.c_proj\.", ".mlp.fc2."),
             (r"\.attn\.out_proj\.", ".self_attn.out_proj.")]
    for k, v in sd.items():
        if k in ("visual.proj", "text_projection"):  # used as x @ P: a Linear weight is P^T
            out["visual_projection.weight" if k == "visual.proj"
                else "text_projection.weight"] = v.t()
            continue
        for pat, rep in names:
            k = re.sub(pat, rep, k)
        m = re.match(r"(.*)\.attn\.in_proj_(weight|bias)$", k)
        if m:
            for part, chunk in zip("qkv", v.chunk(3)):
                out[f"{m[1]}.self_attn.{part}_proj.{m[2]}"] = chunk
        else:
            out[k] = v
    return out


# ------------------------------------------------------------------------- model-based: CLIP family
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L = "openai/clip-vit-large-patch14"
CLIP_MODELS = {  # name -> (model id, id of the tokenizer/image processor when the model has none)
    "pickscore": ("yuvalkirstain/PickScore_v1", CLIP_H),
    "clipscore": (CLIP_L, CLIP_L),
    "hpsv2": ("xswu/HPSv2", CLIP_H),  # open_clip checkpoint HPS_v2.1_compressed.pt, CLIP-H config
    "aesthetic": (CLIP_L, CLIP_L),    # + the MLP head below
}
HPS_FILE = "HPS_v2.1_compressed.pt"
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor",
                  "aesthetic-model.pth")  # LAION predictor v2 weights


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor v2 head (layer names match its released state dict)."""

    def __init__(self, dim=768):
        super().__init__()
        L, D = torch.nn.Linear, torch.nn.Dropout
        self.layers = torch.nn.Sequential(L(dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64),
                                          D(0.1), L(64, 16), L(16, 1))

    def forward(self, x):
        return self.layers(x)


class CLIPReward:
    """A reward from one transformers CLIPModel: normalised image and text embeddings, then
    the named head (see the top of this file for each one's formula and scale)."""

    def __init__(self, name, model_id=None, device="cpu", batch=32, label=None):
        self.name, self.device, self.batch = name, torch.device(device), batch
        self.label = label or name  # the reward named in error messages
        self.model_id = model_id or CLIP_MODELS[name][0]
        self.model = None

    def load(self):
        if self.model is None:  # one copy per (reward, model, device), however many rewards use it
            key = (self.name, self.model_id, str(self.device))
            if key not in _SHARED:
                _SHARED[key] = self._build()
            self.__dict__.update(_SHARED[key])
        return self

    def _build(self):
        quiet()
        from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel
        mid, default_proc = self.model_id, CLIP_MODELS[self.name][1]
        local = os.path.isdir(mid)
        has = lambda f: local and os.path.isfile(os.path.join(mid, f))
        if self.name == "hpsv2" and (has(HPS_FILE) or not has("config.json")):
            path = _hub_file(self.label, mid, HPS_FILE)  # open_clip checkpoint -> CLIPModel
            arch = mid if has("config.json") else default_proc
            config = _load(self.label, arch, lambda: CLIPConfig.from_pretrained(arch))

            def build():
                m = CLIPModel(config)
                sd = torch.load(path, map_location="cpu", weights_only=True)
                m.load_state_dict(openclip_to_hf(sd.get("state_dict", sd)))
                return m
            self.model = _load(self.label, path, build)
        else:
            self.model = _load(self.label, mid, lambda: CLIPModel.from_pretrained(mid))
        self.model.eval().requires_grad_(False).to(self.device)
        proc = mid if has("preprocessor_config.json") else default_proc
        self.tokenizer = _load(self.label, proc, lambda: AutoTokenizer.from_pretrained(proc))
        ip = _load(self.label, proc, lambda: CLIPImageProcessor.from_pretrained(proc))
        crop = ip.crop_size
        self.size = int(crop["height"] if isinstance(crop, dict) else getattr(crop, "height", crop))
        self.mean, self.std = list(ip.image_mean), list(ip.image_std)
        self.max_len = min(77, self.model.config.text_config.max_position_embeddings)
        if self.name == "aesthetic":
            head = _hub_file(self.label, mid if local else AESTHETIC_HEAD[0], AESTHETIC_HEAD[1])
            self.head = AestheticMLP(self.model.config.projection_dim)
            self.head.load_state_dict(_load(self.label, head,
                                            lambda: torch.load(head, map_location="cpu",
                                                               weights_only=True)))
            self.head.eval().requires_grad_(False).to(self.device)
        return {k: getattr(self, k)
                for k in ("model", "tokenizer", "size", "mean", "std", "max_len", "head")
                if hasattr(self, k)}

    def pixels(self, images):
        """(B, 3, H, W) in [0, 1] -> CLIP's input: short side to its size (bicubic), centre crop."""
        return clip_pixels(images.to(self.device), self.size, self.mean, self.std)

    @torch.no_grad()
    def embed_pixels(self, px):
        """CLIP pixel values (B, 3, S, S) -> (B, E) unit-norm image embeddings."""
        out = []
        for i in range(0, len(px), self.batch):
            e = self.model.visual_projection(
                self.model.vision_model(pixel_values=px[i:i + self.batch]).pooler_output)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1))
        return torch.cat(out)

    def image_embeds(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, E) unit-norm image embeddings."""
        return torch.cat([self.embed_pixels(self.pixels(images[i:i + self.batch]))
                          for i in range(0, len(images), self.batch)])

    @torch.no_grad()
    def text_embeds(self, texts):
        """list of B strings -> (B, E) unit-norm text embeddings."""
        out = []
        for i in range(0, len(texts), self.batch):
            tok = self.tokenizer(texts[i:i + self.batch], padding="max_length", truncation=True,
                                 max_length=self.max_len, return_tensors="pt").to(self.device)
            h = self.model.text_model(input_ids=tok.input_ids,
                                      attention_mask=tok.attention_mask).pooler_output
            out.append(torch.nn.functional.normalize(self.model.text_projection(h).float(), dim=-1))
        return torch.cat(out)

    def __call__(self, images, prompts, metadata=None):
        self.load()
        img = self.image_embeds(images)  # (B, E)
        if self.name == "aesthetic":  # the prompt is not used
            with torch.no_grad():
                return self.head(img).squeeze(-1).to(images.device)
        cos = (img * self.text_embeds(list(prompts))).sum(-1)  # (B,)
        scale = self.model.logit_scale.exp().float()
        score = {"pickscore": scale * cos / 26, "clipscore": scale * cos / 30,
                 "hpsv2": cos}[self.name]
        return score.to(images.device)


IMAGEREWARD = "THUDM/ImageReward"  # ImageReward.pt (BLIP ViT-L + BERT + MLP) and med_config.json
IMAGEREWARD_NORM = (0.16717362830052426,
                    1.0333394966054072)  # its reward's mean and std, for (r - mean) / std


def imagereward_to_hf(sd):
    """ImageReward's checkpoint in the names of transformers' BLIP parts, as three state dicts
    (vision, text, mlp). Its vision tower is BLIP's timm-style ViT (patch_embed.proj, cls_token,
    pos_embed, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm); its text
    encoder is BLIP's BERT with cross-attention, whose names transformers' BlipTextModel keeps."""
    vision, text, mlp = {}, {}, {}
    names = [(r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
             (r"^cls_token$", "embeddings.class_embedding"),
             (r"^pos_embed$", "embeddings.position_embedding"), (r"^blocks\.", "encoder.layers."),
             (r"\.norm1\.", ".layer_norm1."), (r"\.norm2\.", ".layer_norm2."),
             (r"\.attn\.qkv\.", ".self_attn.qkv."),
             (r"\.attn\.proj\.", ".self_attn.projection."), (r"^norm\.", "post_layernorm.")]
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            k = k[len("blip.visual_encoder."):]
            for pat, rep in names:
                k = re.sub(pat, rep, k)
            vision[k] = v
        elif k.startswith("blip.text_encoder.") and not k.endswith("position_ids"):
            text[k[len("blip.text_encoder."):]] = v
        elif k.startswith("mlp."):
            mlp[k[len("mlp."):]] = v
    return vision, text, mlp


class ImageReward:
    """ImageReward-v1.0 on transformers' BLIP parts (its package pins an old transformers and
    cannot import beside transformers 5): the image's ViT-L tokens feed the BERT's
    cross-attention over the prompt (35 tokens), whose [CLS] state goes through the MLP head;
    reward = (mlp - mean) / std. The image gets CLIP's transform at 224 px, as the package's."""

    def __init__(self, model_id=None, device="cpu", tokenizer_id="bert-base-uncased"):
        self.model_id, self.device, self.tokenizer_id, self.vision = (
            model_id or IMAGEREWARD, torch.device(device), tokenizer_id, None)

    def load(self):
        if self.vision is not None:
            return self
        quiet()
        import json
        from transformers import (AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig,
                                  BlipVisionModel)
        ckpt, med = (_hub_file("imagereward", self.model_id, f)
                     for f in ("ImageReward.pt", "med_config.json"))

        def build():
            vision, text, mlp = imagereward_to_hf(torch.load(ckpt, map_location="cpu",
                                                             weights_only=True))
            m = json.load(open(med))
            d, patch = (vision["embeddings.class_embedding"].shape[-1],
                        vision["embeddings.patch_embedding.weight"].shape[-1])
            side = round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
            self.vision = BlipVisionModel(BlipVisionConfig(
                hidden_size=d, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_hidden_layers=len({k.split(".")[2] for k in vision
                                       if k.startswith("encoder.layers.")}),
                num_attention_heads=max(1, d // 64), image_size=side * patch, patch_size=patch,
                layer_norm_eps=1e-6))
            self.text = BlipTextModel(BlipTextConfig(
                vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
                num_hidden_layers=m["num_hidden_layers"],
                num_attention_heads=m["num_attention_heads"],
                intermediate_size=m["intermediate_size"],
                max_position_embeddings=m["max_position_embeddings"],
                layer_norm_eps=m["layer_norm_eps"], encoder_hidden_size=m["encoder_width"],
                hidden_act=m["hidden_act"]), add_pooling_layer=False)
            self.mlp = AestheticMLP(m["hidden_size"])  # the same head layout (Linear, Dropout, ...)
            for module, state in [(self.vision, vision), (self.text, text), (self.mlp, mlp)]:
                module.load_state_dict(state)
                module.eval().requires_grad_(False).to(self.device)
            self.size = side * patch
        _load("imagereward", ckpt, build)
        tok = (self.model_id if os.path.isfile(os.path.join(self.model_id, "vocab.txt"))
               else self.tokenizer_id)
        self.tokenizer = _load("imagereward", tok, lambda: AutoTokenizer.from_pretrained(tok))
        return self

    @torch.no_grad()
    def __call__(self, images, prompts, metadata=None):
        self.load()
        px = clip_pixels(images.to(self.device), self.size, CLIP_MEAN, CLIP_STD)
        img = self.vision(pixel_values=px).last_hidden_state  # (B, 1 + patches, D_v)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35,
                             return_tensors="pt").to(self.device)
        h = self.text(input_ids=tok.input_ids, attention_mask=tok.attention_mask,
                      encoder_hidden_states=img,
                      encoder_attention_mask=torch.ones(img.shape[:2], dtype=torch.long,
                                                        device=self.device)
                      ).last_hidden_state[:, 0]
        mean, std = IMAGEREWARD_NORM
        return ((self.mlp(h.float()).squeeze(-1) - mean) / std).to(images.device)


# ---------------------------------------------------------------------------- model-based: GenEval
# GenEval's rules and thresholds: detections above 0.3 confidence (0.9 for counting prompts), at
# most 16 per class; a colour is CLIP's zero-shot pick among 10 colours on the object's masked
# crop; a relation holds when the box centres differ beyond 0.1 x the summed box sizes.
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black",
                  "white"]
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1
# GenEval's class names (its object_names.txt): COCO's 80 detection classes in COCO's order
GENEVAL_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]
# other spellings of those classes in detectors' label files (COCO's own, darknet's)
CLASS_ALIASES = {"sofa": "couch", "motorbike": "motorcycle", "aeroplane": "airplane",
                 "diningtable": "dining table", "pottedplant": "potted plant", "tvmonitor": "tv",
                 "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard",
                 "cellphone": "cell phone", "hair dryer": "hair drier", "sportsball": "sports ball",
                 "donut": "donut", "doughnut": "donut"}


def geneval_classes(id2label):
    """GenEval's name of each detector label. An 80-class head has COCO's order, which GenEval
    relies on (it maps detections to names by index); other heads map by name, aliases applied."""
    if len(id2label) == len(GENEVAL_CLASSES):
        return list(GENEVAL_CLASSES)
    names = [str(id2label[i]).lower().replace("_", " ").replace("-", " ")
             for i in range(len(id2label))]
    return [CLASS_ALIASES.get(n, CLASS_ALIASES.get(n.replace(" ", ""), n)) for n in names]


def geneval_select(detections, tag):
    """Raw detections [{'class', 'score', 'box', 'mask'}] -> class -> the kept ones, best first:
    confidence strictly above the threshold (GenEval's '>'), at most 16 a class."""
    keep = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    objects = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        if d["score"] > keep and len(objects.setdefault(d["class"], [])) < MAX_OBJECTS:
            objects[d["class"]].append(d)
    return {k: v for k, v in objects.items() if v}


def relative_position(a, b):
    """The relations of box a to box b (x0, y0, x1, y1; y down): a subset of
    {'left of', 'right of', 'above', 'below'}, empty when they overlap too much to tell."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2          # centre of a - centre of b
    sizes = (a[2:] - a[:2]).abs() + (b[2:] - b[:2]).abs()
    revised = offset.sign() * (offset.abs() - POSITION_THRESHOLD * sizes).clamp(min=0)
    if revised.abs().max() < 1e-3:
        return set()
    dx, dy = (revised / offset.norm()).tolist()
    return {rel for rel, on in [("left of", dx < -0.5), ("right of", dx > 0.5),
                                ("above", dy < -0.5), ("below", dy > 0.5)] if on}


def geneval_check(objects, meta, colours_of):
    """GenEval's verdict for one image. objects: class -> kept detections (geneval_select);
    meta: {'include': [{'class', 'count', 'color'?, 'position'?: [relation, index]}],
    'exclude': [{'class', 'count'}]}; colours_of(class, detections) -> a colour name for each.
    Returns (correct, reasons it is not)."""
    reasons, groups = [], []
    for req in meta.get("include", []):
        cls, n = req["class"], req["count"]
        found, ok = objects.get(cls, [])[:n], True
        if len(found) < n:
            ok = False
            reasons.append(f"expected {cls} >= {n}, found {len(found)}")
        else:
            if "color" in req:
                colours = colours_of(cls, found)
                if colours.count(req["color"]) < n:
                    ok = False
                    reasons.append(f"expected {req['color']} {cls} >= {n}, found colours {colours}")
            if "position" in req and ok:
                rel, target = req["position"]
                if groups[target] is None:
                    ok = False
                    reasons.append(f"no target for {cls} to be {rel}")
                elif not all(rel in relative_position(o["box"], t["box"])
                             for o in found for t in groups[target]):
                    ok = False
                    reasons.append(f"expected {cls} {rel} target")
        groups.append(found if ok else None)
    for req in meta.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            reasons.append(f"expected {req['class']} < {req['count']}, "
                           f"found {len(objects[req['class']])}")
    return not reasons, "; ".join(reasons)


def geneval_partial(objects, meta, colours_of):
    """Flow-GRPO's partial GenEval score (its reward server), the mean of one term per clause:
    per include clause, the count 1 - |n - found| / n (every kept detection of the class); when
    the count is exact, colour 1 - |n - matching| / n and position 1 (all relations hold) or 0,
    else 0 for each of those clauses. (The public code also appends a 1 after a failed position,
    an evident slip; here a failed position is 0.) Exclude clauses have no term."""
    terms, groups = [], []
    for req in meta.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])
        terms.append(1 - abs(n - len(found)) / n)
        extra = [k for k in ("color", "position") if k in req]
        if len(found) != n:
            terms += [0.0] * len(extra)
            groups.append(None)
            continue
        ok = True
        if "color" in req:
            match = colours_of(cls, found).count(req["color"])
            terms.append(1 - abs(n - match) / n)
            ok = match == n
        if "position" in req:
            rel, target = req["position"]
            holds = ok and groups[target] is not None and all(
                rel in relative_position(o["box"], t["box"]) for o in found for t in groups[target])
            terms.append(float(holds))
            ok = holds
        groups.append(found if ok else None)
    return sum(terms) / len(terms) if terms else 0.0


class GenEval:
    """GenEval without mmdet: a COCO instance-segmentation Mask2Former (transformers; GenEval
    itself uses mmdet's Mask2Former, another implementation and input size, so this is a
    training reward, not the official metric) and CLIP ViT-L/14 for colours. partial=False: the
    verdict, 1 or 0 (its mean over prompts is GenEval's score); True: Flow-GRPO's partial score.
    metadata: GenEval's per-prompt dicts."""
    DETECTOR = "facebook/mask2former-swin-small-coco-instance"

    def __init__(self, model_id=None, device="cpu", clip_id=CLIP_L, partial=False):
        self.detector_id, self.device, self.partial = (model_id or self.DETECTOR,
                                                       torch.device(device), partial)
        self.clip = CLIPReward("clipscore", clip_id, device, label="geneval")
        self.detector, self.palette = None, {}

    def load(self):
        if self.detector is None:
            quiet()
            from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
            i = self.detector_id

            def build():  # the verdict and the partial score share one detector
                proc = _load("geneval", i, lambda: AutoImageProcessor.from_pretrained(i))
                det = _load("geneval", i,
                            lambda: Mask2FormerForUniversalSegmentation.from_pretrained(i))
                return proc, det.eval().requires_grad_(False).to(self.device)
            if (i, str(self.device)) not in _SHARED:
                _SHARED[(i, str(self.device))] = build()
            self.processor, self.detector = _SHARED[(i, str(self.device))]
            self.names = geneval_classes(self.detector.config.id2label)
            self.clip.load()
        return self

    @torch.no_grad()
    def detect(self, images):
        """(B, 3, H, W) in [0, 1] -> per image [{'class', 'score', 'box' (x0, y0, x1, y1),
        'mask'}]."""
        from PIL import Image
        self.load()
        H, W = images.shape[-2:]
        ims = [Image.fromarray(im) for im in uint8(images)]
        inputs = self.processor(images=ims, return_tensors="pt").to(self.device)
        res = self.processor.post_process_instance_segmentation(
            self.detector(**inputs), threshold=THRESHOLD, target_sizes=[(H, W)] * len(ims),
            return_binary_maps=True)
        out = []
        for r in res:
            dets = []
            for k, seg in enumerate(r["segments_info"]):
                mask = r["segmentation"][k].bool().cpu()
                if mask.any():
                    ys, xs = mask.nonzero(as_tuple=True)
                    box = (xs.min().item(), ys.min().item(), xs.max().item() + 1,
                           ys.max().item() + 1)
                    dets.append({"class": self.names[seg["label_id"]], "score": seg["score"],
                                 "box": box, "mask": mask})
            out.append(dets)
        return out

    def crops(self, image, dets):
        """CLIP's input for each detection, as GenEval makes it: the image grey (#999) outside the
        object's mask, cropped to its box, then CLIP's own transform (short side to 224, bicubic,
        centre crop). (N, 3, S, S)."""
        im, out = image.float().cpu(), []
        for d in dets:
            x0, y0, x1, y1 = [int(v) for v in d["box"]]
            masked = (im if d.get("mask") is None
                      else torch.where(d["mask"], im, torch.full_like(im, 0.6)))
            out.append(self.clip.pixels(masked[None, :, y0:y1, x0:x1]))
        return torch.cat(out)

    @torch.no_grad()
    def colours(self, image, cls, dets):
        """CLIP's zero-shot colour of each detection (GenEval's three prompts per colour)."""
        self.load()
        if cls not in self.palette:
            temps = [f"a photo of a {{}} {cls}", f"a photo of a {{}}-colored {cls}",
                     "a photo of a {} object"]
            e = torch.stack([self.clip.text_embeds([t.format(c) for c in GENEVAL_COLORS])
                             for t in temps])
            self.palette[cls] = torch.nn.functional.normalize(e.mean(0), dim=-1)  # (10, E)
        picks = (self.clip.embed_pixels(self.crops(image, dets)) @ self.palette[cls].T).argmax(-1)
        return [GENEVAL_COLORS[i] for i in picks.tolist()]

    def verdicts(self, images, metadata):
        """[(correct, reasons)] for each image under its GenEval metadata."""
        return [geneval_check(geneval_select(dets, m.get("tag")), m,
                              lambda c, ds, im=im: self.colours(im, c, ds))
                for im, dets, m in zip(images, self.detect(images), self._meta(metadata))]

    def _meta(self, metadata):
        if not metadata or any(not m or "include" not in m for m in metadata):
            raise ValueError("the geneval reward needs GenEval metadata for every prompt "
                             "(--prompts a GenEval metadata jsonl)")
        return metadata

    def __call__(self, images, prompts, metadata=None):
        if not self.partial:
            return torch.tensor([float(ok) for ok, _ in self.verdicts(images, metadata)],
                                device=images.device)
        return torch.tensor([geneval_partial(geneval_select(dets, m.get("tag")), m,
                                             lambda c, ds, im=im: self.colours(im, c, ds))
                             for im, dets, m in zip(images, self.detect(images),
                                                    self._meta(metadata))],
                            device=images.device)


def export_geneval(folder, metas, prompt_index, seed_index, images):
    """Images in the layout GenEval's evaluation/evaluate_images.py reads: <folder>/<prompt index
    :05>/metadata.jsonl (the prompt's metadata, one JSON object) and samples/<seed :05>.png."""
    import json
    from PIL import Image
    for meta, i, s, im in zip(metas, prompt_index, seed_index, uint8(images)):
        d = os.path.join(folder, f"{i:05d}")
        os.makedirs(os.path.join(d, "samples"), exist_ok=True)
        with open(os.path.join(d, "metadata.jsonl"), "w") as f:
            json.dump(meta, f)
        Image.fromarray(im).save(os.path.join(d, "samples", f"{s:05d}.png"))


# ---------------------------------------------------------------------------- registry
WEIGHT_FREE = ("color", "position", "jpeg", "vivid", "faded", "exact", "jpeg_compressibility",
               "jpeg_incompressibility")
REGISTRY = {  # name -> (factory(model_id or None, device) -> fn, what it needs)
    "color": (lambda i, d: color, "nothing (toy: mean colour vs the colour named in the prompt)"),
    "position": (lambda i, d: position, "nothing (toy: the named side brighter than the opposite)"),
    "jpeg": (lambda i, d: jpeg_compressibility, "Pillow (toy task name for jpeg_compressibility)"),
    "vivid": (lambda i, d: vivid, "nothing (toy: the saturation of the mean colour)"),
    "faded": (lambda i, d: faded, "nothing (toy: 1 - the saturation of the mean colour)"),
    "exact": (lambda i, d: exact, "nothing (toy: 1 if the mean colour is the named one, else 0)"),
    "jpeg_compressibility": (lambda i, d: jpeg_compressibility, "Pillow"),
    "jpeg_incompressibility": (lambda i, d: jpeg_incompressibility, "Pillow"),
    "ocr": (lambda i, d: OCR(d), "rapidocr-onnxruntime (models ship in the wheel: offline)"),
    "pickscore": (lambda i, d: CLIPReward("pickscore", i, d),
                  f"transformers + {CLIP_MODELS['pickscore'][0]} (hub)"),
    "clipscore": (lambda i, d: CLIPReward("clipscore", i, d), f"transformers + {CLIP_L} (hub)"),
    "hpsv2": (lambda i, d: CLIPReward("hpsv2", i, d),
              f"transformers + xswu/HPSv2/{HPS_FILE} (hub, open_clip format)"),
    "aesthetic": (lambda i, d: CLIPReward("aesthetic", i, d),
                  f"transformers + {CLIP_L} + {'/'.join(AESTHETIC_HEAD)} (hub)"),
    "imagereward": (lambda i, d: ImageReward(i, d),
                    f"transformers (BLIP) + {IMAGEREWARD} + bert-base-uncased (hub)"),
    "geneval": (lambda i, d: GenEval(i, d),
                f"transformers + scipy + {GenEval.DETECTOR} + {CLIP_L} (hub); GenEval metadata"),
    "geneval_partial": (lambda i, d: GenEval(i, d, partial=True),
                        "as geneval; Flow-GRPO's partial score"),
}


def load(spec, device="cpu", eager=False):
    """A reward callable from a name or a weighted mix 'a:1,b:2' (weights normalised to sum 1);
    'name=ID_OR_DIR' picks another model. A bad spec fails here, not mid-training; eager=True
    also loads the models now, so that missing weights fail before any training."""
    parts = []
    for item in [s for s in spec.split(",") if s.strip()]:
        name, _, w = item.strip().partition(":")
        name, _, model_id = name.partition("=")
        if name not in REGISTRY:
            raise ValueError(f"unknown reward {name!r} (known: {', '.join(REGISTRY)})")
        try:
            w = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"bad weight {w!r} for reward {name!r} in {spec!r}") from None
        if not w > 0 or w == float("inf"):
            raise ValueError(f"reward weights must be positive and finite: {item!r}")
        if model_id and name in (*WEIGHT_FREE, "ocr"):
            raise ValueError(f"reward {name!r} has no model to choose: {item!r}")
        fn = REGISTRY[name][0](model_id or None, device)
        if eager and hasattr(fn, "load"):
            fn.load()
        parts.append((fn, w))
    if not parts:
        raise ValueError(f"empty reward spec {spec!r}")
    if len(parts) == 1:
        return parts[0][0]
    total = sum(w for _, w in parts)

    def mix(images, prompts, metadata=None):
        return sum(w / total * fn(images, prompts, metadata).float() for fn, w in parts)
    return mix


def time_per_image(spec, size=512, n=8):
    """Seconds per image of a reward on n random images of size x size (first call excluded)."""
    import time
    fn = load(spec, eager=True)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g)
    prompts = ['a red cat on the left with a sign that says "hello"'] * n
    meta = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}]}] * n
    fn(images[:1], prompts[:1], meta[:1])
    t0 = time.perf_counter()
    fn(images, prompts, meta)
    return (time.perf_counter() - t0) / n


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="rewards for DiffusionOPD")
    ap.add_argument("--list", action="store_true",
                    help="print the registry and what each reward needs")
    ap.add_argument("--time", metavar="SPEC",
                    help="measure seconds per image of these rewards on CPU")
    ap.add_argument("--size", type=int, default=512, help="--time: image size")
    args = ap.parse_args()
    if args.list:
        for name, (_, needs) in REGISTRY.items():
            print(f"{name:<24} {needs}")
    elif args.time:
        for name in args.time.split(","):
            try:
                print(f"{name:<24} {time_per_image(name, args.size):.4f} s/image "
                      f"at {args.size}x{args.size}")
            except (ValueError, RewardError) as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
    else:
        print(__doc__)

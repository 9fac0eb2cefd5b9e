"""
Rewards for DiffusionOPD: one interface for every reward.

    fn = rewards.load("color")                 # a name, or a weighted mix "pickscore:1,clipscore:1,hpsv2:1"
    r = fn(images, prompts, metadata=None)     # images (B, 3, H, W) in [0, 1] -> (B,) float tensor
    python rewards.py --list                   # the registry, with what each needs

Weight-free rewards (work anywhere; the toy ones are used by the tiny default model):
  color, position, jpeg (toy tasks), jpeg_compressibility, jpeg_incompressibility (DDPO).
Model-based rewards (loaded lazily on the first call, once; no grad; batched):
  ocr          rapidocr-onnxruntime: its PP-OCR models ship in the wheel, so it works offline.
  pickscore    PickScore_v1 (CLIP-H): exp(logit_scale) * cos(image, text) / 26   (Flow-GRPO's scale)
  clipscore    CLIP ViT-L/14:         exp(logit_scale) * cos(image, text) / 30   (Flow-GRPO's scale)
  hpsv2        HPSv2.1 (CLIP-H):      cos(image, text)  (about 0.2-0.35)
  aesthetic    LAION aesthetic predictor v2: an MLP on the normalised CLIP ViT-L/14 image
               embedding, the raw score (about 1-10; DDPO and Flow-GRPO use it unscaled)
  imagereward  ImageReward-v1.0 through its own package (pip install image-reward)
  geneval      GenEval's rules over a COCO Mask2Former (transformers) and CLIP colour labels
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
    """An optional package a reward needs, imported on first use, or one line saying how to get it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RewardError(f"the {name!r} reward needs {module}: pip install {pip}") from None


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
    target = torch.tensor([COLORS[_word(p, COLORS, "colour")] for p in prompts], dtype=torch.float32)
    return 1 - (images.float().mean((2, 3)) - target.to(images.device)).norm(dim=1) / 3**0.5


def position(images, prompts, metadata=None):
    """Brightness of the side the prompt names minus that of the opposite side, in [-1, 1]."""
    g = images.float().mean(1)  # (B, H, W) grey
    H, W = g.shape[1:]
    halves = {"left": g[:, :, : W // 2], "right": g[:, :, W - W // 2:],
              "top": g[:, : H // 2], "bottom": g[:, H - H // 2:]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    sides = [_word(p, SIDES, "side") for p in prompts]
    return torch.stack([halves[s][i].mean() - halves[opposite[s]][i].mean() for i, s in enumerate(sides)])


def _uint8(images):
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8 numpy, as PIL and OCR engines want it."""
    return (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def _jpeg_kb(images, quality=95):
    from PIL import Image
    out = []
    for im in _uint8(images):
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
    """The text to render: the first quoted span of the prompt."""
    m = re.search(r'"([^"]+)"|\'([^\']+)\'|“([^”]+)”', prompt)
    if not m:
        raise ValueError(f"the OCR prompt {prompt!r} has no quoted text to render")
    return next(g for g in m.groups() if g)


class OCR:
    """Flow-GRPO's OCR reward: 1 - min(1, Levenshtein(pred, target) / len(target)) on lower-cased
    text without spaces; the prediction is all text rapidocr reads, joined."""

    def __init__(self, device="cpu"):
        self.engine = None

    def load(self):
        if self.engine is None:
            self.engine = _package("ocr", "rapidocr_onnxruntime", "rapidocr-onnxruntime").RapidOCR()
        return self

    def __call__(self, images, prompts, metadata=None):
        self.load()
        norm = lambda s: re.sub(r"\s+", "", s.lower())
        out = []
        for im, p in zip(_uint8(images), prompts):
            result, _ = self.engine(im[..., ::-1].copy())  # RapidOCR takes BGR arrays
            pred = norm("".join(r[1] for r in result or []))
            target = norm(ocr_target(p))
            out.append(1 - min(1.0, _levenshtein(pred, target) / max(1, len(target))))
        return torch.tensor(out, device=images.device)


# ---------------------------------------------------------------------------- model-based: loading
def _load(name, model_id, fn):
    """fn() loads model_id from the hub or its cache; any failure becomes one RewardError line."""
    try:
        return fn()
    except RewardError:
        raise
    except Exception as e:  # offline and not cached, gated, bad folder, ...
        raise RewardError(f"reward {name!r} cannot load {model_id!r} ({type(e).__name__}): download it "
                          f"once with network access (it is then cached), or pass a local folder "
                          f"as {name}=DIR in the reward spec") from None


def _quiet():
    """transformers: errors only (its image processors warn that torchvision is absent)."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _hub_file(name, repo, filename):
    """A single weight file: a local path, or downloaded from (or found in the cache of) a hub repo."""
    if os.path.isfile(repo):
        return repo
    if os.path.isdir(repo):
        return os.path.join(repo, filename)
    from huggingface_hub import hf_hub_download
    return _load(name, f"{repo}/{filename}", lambda: hf_hub_download(repo, filename))


def clip_pixels(images, size, mean, std):
    """CLIP preprocessing on a tensor batch (B, 3, H, W) in [0, 1]: bicubic resize of the short
    side to size, centre crop, normalise (the CLIPImageProcessor steps, without a PIL round trip)."""
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
             (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
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
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t()
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


# ---------------------------------------------------------------------------- model-based: CLIP family
CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L = "openai/clip-vit-large-patch14"
CLIP_MODELS = {  # name -> (model id, id of the tokenizer/image processor when the model has none)
    "pickscore": ("yuvalkirstain/PickScore_v1", CLIP_H),
    "clipscore": (CLIP_L, CLIP_L),
    "hpsv2": ("xswu/HPSv2", CLIP_H),        # open_clip checkpoint HPS_v2.1_compressed.pt, CLIP-H config
    "aesthetic": (CLIP_L, CLIP_L),          # + the MLP head below
}
HPS_FILE = "HPS_v2.1_compressed.pt"
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")  # LAION predictor v2 weights


class AestheticMLP(torch.nn.Module):
    """The LAION aesthetic predictor v2 head (layer names match its released state dict)."""

    def __init__(self, dim=768):
        super().__init__()
        L, D = torch.nn.Linear, torch.nn.Dropout
        self.layers = torch.nn.Sequential(L(dim, 1024), D(0.2), L(1024, 128), D(0.2), L(128, 64), D(0.1),
                                          L(64, 16), L(16, 1))

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
        if self.model is not None:
            return self
        _quiet()
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
            self.head.load_state_dict(_load(self.label, head, lambda: torch.load(head, map_location="cpu",
                                                                                weights_only=True)))
            self.head.eval().requires_grad_(False).to(self.device)
        return self

    @torch.no_grad()
    def image_embeds(self, images):
        """(B, 3, H, W) in [0, 1] -> (B, E) unit-norm image embeddings."""
        out = []
        for i in range(0, len(images), self.batch):
            px = clip_pixels(images[i:i + self.batch].to(self.device), self.size, self.mean, self.std)
            e = self.model.visual_projection(self.model.vision_model(pixel_values=px).pooler_output)
            out.append(torch.nn.functional.normalize(e.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()
    def text_embeds(self, texts):
        """list of B strings -> (B, E) unit-norm text embeddings."""
        out = []
        for i in range(0, len(texts), self.batch):
            tok = self.tokenizer(texts[i:i + self.batch], padding="max_length", truncation=True,
                                 max_length=self.max_len, return_tensors="pt").to(self.device)
            h = self.model.text_model(input_ids=tok.input_ids, attention_mask=tok.attention_mask).pooler_output
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
        score = {"pickscore": scale * cos / 26, "clipscore": scale * cos / 30, "hpsv2": cos}[self.name]
        return score.to(images.device)


class ImageReward:
    """ImageReward-v1.0 (BLIP + MLP, normalised) through its own package, which brings its BLIP code."""

    def __init__(self, model_id=None, device="cpu"):
        self.model_id, self.device, self.model = model_id or "ImageReward-v1.0", device, None

    def load(self):
        if self.model is None:
            RM = _package("imagereward", "ImageReward", "image-reward (not in requirements.txt: it pins its own "
                          "timm/BLIP stack)")
            self.model = _load("imagereward", self.model_id, lambda: RM.load(self.model_id, device=str(self.device)))
        return self

    def __call__(self, images, prompts, metadata=None):
        self.load()
        from PIL import Image
        with torch.no_grad():
            return torch.tensor([float(self.model.score(p, [Image.fromarray(im)]))
                                 for im, p in zip(_uint8(images), prompts)], device=images.device)


# ---------------------------------------------------------------------------- model-based: GenEval
# GenEval's rules and thresholds: detections above 0.3 confidence (0.9 for counting prompts), at
# most 16 per class; a colour is CLIP's zero-shot pick among 10 colours on the object's masked
# crop; a relation holds when the box centres differ beyond 0.1 x the summed box sizes.
GENEVAL_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1


def geneval_select(detections, tag):
    """Raw detections [{'class', 'score', 'box', 'mask'}] -> class -> the kept ones, best first."""
    keep = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    objects = {}
    for d in sorted(detections, key=lambda d: -d["score"]):
        if d["score"] >= keep and len(objects.setdefault(d["class"], [])) < MAX_OBJECTS:
            objects[d["class"]].append(d)
    return objects


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
                elif not all(rel in relative_position(o["box"], t["box"]) for o in found for t in groups[target]):
                    ok = False
                    reasons.append(f"expected {cls} {rel} target")
        groups.append(found if ok else None)
    for req in meta.get("exclude", []):
        if len(objects.get(req["class"], [])) >= req["count"]:
            reasons.append(f"expected {req['class']} < {req['count']}, found {len(objects[req['class']])}")
    return not reasons, "; ".join(reasons)


class GenEval:
    """GenEval without mmdet: a COCO instance-segmentation Mask2Former (transformers; GenEval
    itself uses a Mask2Former) and CLIP ViT-L/14 for colours. Reward = the verdict, 1 or 0
    (its mean over prompts is GenEval's score). metadata: GenEval's per-prompt dicts."""
    DETECTOR = "facebook/mask2former-swin-small-coco-instance"

    def __init__(self, model_id=None, device="cpu", clip_id=CLIP_L):
        self.detector_id, self.device = model_id or self.DETECTOR, torch.device(device)
        self.clip = CLIPReward("clipscore", clip_id, device, label="geneval")
        self.detector, self.palette = None, {}

    def load(self):
        if self.detector is None:
            _quiet()
            from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation
            i = self.detector_id
            self.processor = _load("geneval", i, lambda: AutoImageProcessor.from_pretrained(i))
            self.detector = _load("geneval", i, lambda: Mask2FormerForUniversalSegmentation.from_pretrained(i))
            self.detector.eval().requires_grad_(False).to(self.device)
            self.clip.load()
        return self

    @torch.no_grad()
    def detect(self, images):
        """(B, 3, H, W) in [0, 1] -> per image [{'class', 'score', 'box' (x0, y0, x1, y1), 'mask'}]."""
        from PIL import Image
        self.load()
        H, W = images.shape[-2:]
        ims = [Image.fromarray(im) for im in _uint8(images)]
        inputs = self.processor(images=ims, return_tensors="pt").to(self.device)
        res = self.processor.post_process_instance_segmentation(
            self.detector(**inputs), threshold=THRESHOLD, target_sizes=[(H, W)] * len(ims), return_binary_maps=True)
        names = self.detector.config.id2label
        out = []
        for r in res:
            dets = []
            for k, seg in enumerate(r["segments_info"]):
                mask = r["segmentation"][k].bool().cpu()
                if mask.any():
                    ys, xs = mask.nonzero(as_tuple=True)
                    box = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
                    dets.append({"class": names[seg["label_id"]], "score": seg["score"], "box": box, "mask": mask})
            out.append(dets)
        return out

    @torch.no_grad()
    def colours(self, image, cls, dets):
        """CLIP's zero-shot colour of each detection: its box crop, grey outside its mask."""
        self.load()
        if cls not in self.palette:
            temps = [f"a photo of a {{}} {cls}", f"a photo of a {{}}-colored {cls}", "a photo of a {} object"]
            e = torch.stack([self.clip.text_embeds([t.format(c) for c in GENEVAL_COLORS]) for t in temps])
            self.palette[cls] = torch.nn.functional.normalize(e.mean(0), dim=-1)  # (10, E)
        crops = []
        for d in dets:
            x0, y0, x1, y1 = [int(v) for v in d["box"]]
            im = image.float().cpu()
            if d.get("mask") is not None:
                im = torch.where(d["mask"].to(im.device), im, torch.full_like(im, 0.6))
            crops.append(torch.nn.functional.interpolate(im[None, :, y0:y1, x0:x1], size=(64, 64), mode="bilinear"))
        picks = (self.clip.image_embeds(torch.cat(crops)) @ self.palette[cls].T).argmax(-1)
        return [GENEVAL_COLORS[i] for i in picks.tolist()]

    def verdicts(self, images, metadata):
        """[(correct, reasons)] for each image under its GenEval metadata."""
        if not metadata or any(not m or "include" not in m for m in metadata):
            raise ValueError("the geneval reward needs GenEval metadata for every prompt "
                             "(--prompts a GenEval metadata jsonl)")
        return [geneval_check(geneval_select(dets, m.get("tag")), m, lambda c, ds, im=im: self.colours(im, c, ds))
                for im, dets, m in zip(images, self.detect(images), metadata)]

    def __call__(self, images, prompts, metadata=None):
        return torch.tensor([float(ok) for ok, _ in self.verdicts(images, metadata)], device=images.device)


# ---------------------------------------------------------------------------- registry
REGISTRY = {  # name -> (factory(model_id or None, device) -> fn, what it needs)
    "color": (lambda i, d: color, "nothing (toy: mean colour vs the colour named in the prompt)"),
    "position": (lambda i, d: position, "nothing (toy: the named side brighter than the opposite)"),
    "jpeg": (lambda i, d: jpeg_compressibility, "Pillow (toy task name for jpeg_compressibility)"),
    "jpeg_compressibility": (lambda i, d: jpeg_compressibility, "Pillow"),
    "jpeg_incompressibility": (lambda i, d: jpeg_incompressibility, "Pillow"),
    "ocr": (lambda i, d: OCR(d), "rapidocr-onnxruntime (models ship in the wheel: offline)"),
    "pickscore": (lambda i, d: CLIPReward("pickscore", i, d), f"transformers + {CLIP_MODELS['pickscore'][0]} (hub)"),
    "clipscore": (lambda i, d: CLIPReward("clipscore", i, d), f"transformers + {CLIP_L} (hub)"),
    "hpsv2": (lambda i, d: CLIPReward("hpsv2", i, d), f"transformers + xswu/HPSv2/{HPS_FILE} (hub, open_clip format)"),
    "aesthetic": (lambda i, d: CLIPReward("aesthetic", i, d), f"transformers + {CLIP_L} + {'/'.join(AESTHETIC_HEAD)} (hub)"),
    "imagereward": (lambda i, d: ImageReward(i, d), "pip install image-reward (its own package and weights)"),
    "geneval": (lambda i, d: GenEval(i, d), f"transformers + {GenEval.DETECTOR} + {CLIP_L} (hub); GenEval metadata"),
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
        if model_id and name in ("color", "position", "jpeg", "jpeg_compressibility", "jpeg_incompressibility", "ocr"):
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
    ap.add_argument("--list", action="store_true", help="print the registry and what each reward needs")
    ap.add_argument("--time", metavar="SPEC", help="measure seconds per image of these rewards on CPU")
    ap.add_argument("--size", type=int, default=512, help="--time: image size")
    args = ap.parse_args()
    if args.list:
        for name, (_, needs) in REGISTRY.items():
            print(f"{name:<24} {needs}")
    elif args.time:
        for name in args.time.split(","):
            try:
                print(f"{name:<24} {time_per_image(name, args.size):.4f} s/image at {args.size}x{args.size}")
            except (ValueError, RewardError) as e:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
    else:
        print(__doc__)

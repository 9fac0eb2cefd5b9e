"""
Rewards for DiffusionOPD: one interface for every reward.

    fn = rewards.load("color")                       # or a weighted mix "jpeg:1,color:2"
    r = fn(images, prompts, metadata=None)           # images (B, 3, H, W) in [0, 1] -> (B,)
    python rewards.py --list                         # the registry, with what each needs

Weight-free rewards (work anywhere, used by the tiny default model, labelled as toys):
  color, position, jpeg (toy tasks), jpeg_compressibility, jpeg_incompressibility (DDPO).
Model-based rewards (optional extras, loaded lazily on first call):
  ocr (rapidocr-onnxruntime: its PP-OCR models ship in the wheel, so it works offline).
"""
import io
import re
import sys

import torch

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


def _jpeg_kb(images, quality=95):
    from PIL import Image
    out = []
    for im in (images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy():
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

    def __call__(self, images, prompts, metadata=None):
        if self.engine is None:
            try:
                from rapidocr_onnxruntime import RapidOCR
            except ImportError:
                raise RuntimeError("the 'ocr' reward needs rapidocr-onnxruntime: "
                                   "pip install rapidocr-onnxruntime") from None
            self.engine = RapidOCR()
        norm = lambda s: re.sub(r"\s+", "", s.lower())
        out = []
        for im, p in zip((images.float().clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy(), prompts):
            result, _ = self.engine(im[..., ::-1].copy())  # RapidOCR takes BGR arrays
            pred = norm("".join(r[1] for r in result or []))
            target = norm(ocr_target(p))
            out.append(1 - min(1.0, _levenshtein(pred, target) / max(1, len(target))))
        return torch.tensor(out, device=images.device)


# ---------------------------------------------------------------------------- registry
REGISTRY = {  # name -> (factory(device) -> fn, what it needs)
    "color": (lambda d: color, "nothing (toy: mean colour vs the colour named in the prompt)"),
    "position": (lambda d: position, "nothing (toy: the named side brighter than the opposite)"),
    "jpeg": (lambda d: jpeg_compressibility, "Pillow (toy task name for jpeg_compressibility)"),
    "jpeg_compressibility": (lambda d: jpeg_compressibility, "Pillow"),
    "jpeg_incompressibility": (lambda d: jpeg_incompressibility, "Pillow"),
    "ocr": (lambda d: OCR(d), "rapidocr-onnxruntime (models ship in the wheel: offline)"),
}


def load(spec, device="cpu"):
    """A reward callable from a name or a weighted mix 'a:1,b:2' (weights normalised to sum 1).
    A bad spec fails here, not mid-training."""
    parts = []
    for item in [s for s in spec.split(",") if s.strip()]:
        name, _, w = item.strip().partition(":")
        if name not in REGISTRY:
            raise ValueError(f"unknown reward {name!r} (known: {', '.join(REGISTRY)})")
        try:
            w = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"bad weight {w!r} for reward {name!r} in {spec!r}") from None
        if not w > 0:
            raise ValueError(f"reward weights must be positive: {item!r}")
        parts.append((REGISTRY[name][0](device), w))
    if not parts:
        raise ValueError(f"empty reward spec {spec!r}")
    if len(parts) == 1:
        return parts[0][0]
    total = sum(w for _, w in parts)

    def mix(images, prompts, metadata=None):
        return sum(w / total * fn(images, prompts, metadata).float() for fn, w in parts)
    return mix


if __name__ == "__main__":
    if "--list" in sys.argv[1:]:
        for name, (_, needs) in REGISTRY.items():
            print(f"{name:<24} {needs}")
    else:
        print(__doc__)

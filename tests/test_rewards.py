"""Rewards and prompts against their original projects' conventions (read from their public
source), on tiny random models built from configs and on synthetic detections."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import rewards
from conftest import HERE, one_line_error, run
from opd_support import tiny
from opd_support.loras import LORA_FILE


@pytest.mark.slow
@pytest.mark.parametrize("task", ["ocr", "geneval", "aesthetic"])
def test_real_tasks_run_with_built_in_prompts(task, tmp_path):
    """No --prompts: the built-in sets. OCR (rapidocr ships its models) trains on the tiny model;
    GenEval and the aesthetic mix need downloads and stop at once with one line naming a model."""
    r = run("--task", task, "--stage", "teacher", "--optim_steps", "2", "--batch_size", "4",
            "--group_size", "2", "--sampler_steps", "3", "--out", str(tmp_path / "o"),
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    if task == "ocr":
        assert r.returncode == 0, r.stderr[-2000:]
        assert os.path.isfile(tmp_path / "o" / "teacher-ocr" / LORA_FILE)
    else:
        one_line_error(r, "network")


def _render(text, w=512, h=256):
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).text((20, h // 2 - 30), text, fill="black",
                            font=ImageFont.load_default(size=56))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255


def test_ocr_reads_rendered_text_offline():
    import rewards
    fn = rewards.load("ocr")
    target = 'a street sign that says "Hello World"'
    texts = ["Hello World", "Helo World", "Helo Wrld", ""]
    r = fn(torch.stack([_render(t) for t in texts]), [target] * len(texts))
    assert r.shape == (4,) and r[0] >= 0.9 and r[3] == 0
    for t, got in zip(texts[1:3], r[1:3]):  # a misspelled render scores as its edit distance
                                            # predicts
        want = 1 - rewards._levenshtein(t.lower().replace(" ", ""),
                                        "helloworld") / len("helloworld")
        assert abs(got.item() - want) < 1e-6, (t, got, want)


def _tiny_clip(d, seed=0):
    """A tiny random transformers CLIP saved as a model folder (no download): model, the toy
    byte-level tokenizer, a 32 px image processor; plus a random aesthetic head."""
    import rewards
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(seed)
    tok = tiny.toy_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1, hidden_act="gelu"),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, hidden_act="gelu"),
                     projection_dim=16, logit_scale_init_value=math.log(50.0))
    model = CLIPModel(cfg).eval()
    model.save_pretrained(d)
    tok.save_pretrained(d)
    CLIPImageProcessor(size={"shortest_edge": 32},
                       crop_size={"height": 32, "width": 32}).save_pretrained(d)
    torch.save(rewards.AestheticMLP(16).state_dict(), os.path.join(d, rewards.AESTHETIC_HEAD[1]))
    return model, tok


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("clip"))
    model, tok = _tiny_clip(d)
    g = torch.Generator().manual_seed(1)
    images = (torch.randint(0, 256, (5, 3, 32, 32), generator=g)
              / 255).float()  # exact uint8 values
    prompts = ["a red cat", "a blue dog on the left", "a green car", "a plain picture of a bird",
               ""]
    with torch.no_grad():  # the reference: CLIPModel's own forward on CLIPProcessor inputs
        from transformers import CLIPImageProcessor
        px = CLIPImageProcessor.from_pretrained(d)(
            [(im * 255).round().byte().permute(1, 2, 0).numpy() for im in images],
            return_tensors="pt").pixel_values
        t = tok(prompts, padding="max_length", max_length=77, return_tensors="pt")
        out = model(input_ids=t.input_ids, attention_mask=t.attention_mask, pixel_values=px)
    return d, model, images, prompts, out


@pytest.mark.parametrize("name,scale", [("pickscore", 1 / 26), ("clipscore", 1 / 30),
                                        ("hpsv2", None)])
def test_clip_family_scores_and_scaling(tiny_clip, name, scale):
    import rewards
    d, model, images, prompts, out = tiny_clip
    fn = rewards.load(f"{name}={d}")
    r = fn(images, prompts)
    logits = out.logits_per_image.diagonal()  # exp(logit_scale) * cos
    want = logits * scale if scale else logits / model.logit_scale.exp()
    assert r.shape == (5,) and torch.allclose(r, want, atol=1e-5), (r, want)
    assert torch.equal(fn(images, prompts), r)  # deterministic
    parts = torch.cat([fn(images[:1], prompts[:1]), fn(images[1:], prompts[1:])])
    assert torch.allclose(parts, r, atol=1e-6)  # batch-size invariant
    assert r.std() > 0  # the prompts and images matter


def test_aesthetic_head_on_clip_image_embedding(tiny_clip):
    import rewards
    d, model, images, prompts, out = tiny_clip
    fn = rewards.load(f"aesthetic={d}")
    head = rewards.AestheticMLP(16)
    head.load_state_dict(torch.load(os.path.join(d, rewards.AESTHETIC_HEAD[1])))
    with torch.no_grad():
        want = head.eval()(out.image_embeds).squeeze(-1)  # CLIPModel's image_embeds are unit-norm
    r = fn(images, ["anything"] * 5)
    assert torch.allclose(r, want, atol=1e-5) and torch.allclose(fn(images, [""] * 5), r)


def test_hpsv2_open_clip_checkpoint_converted(tiny_clip, tmp_path):
    """HPSv2.1 ships an open_clip checkpoint: written here in open_clip's layout from the tiny
    CLIP (fused q/k/v in-projection, x @ proj matrices), it must load and score the same."""
    import shutil
    import rewards
    d, model, images, prompts, out = tiny_clip
    sd, oc = model.state_dict(), {"logit_scale": model.logit_scale.detach()}
    for tower, src, n in [("visual.", "vision_model.", 2), ("", "text_model.", 2)]:
        for i in range(n):
            a, b = f"{src}encoder.layers.{i}.", f"{tower}transformer.resblocks.{i}."
            for w in ("weight", "bias"):
                oc[f"{b}attn.in_proj_{w}"] = torch.cat([sd[f"{a}self_attn.{p}_proj.{w}"]
                                                        for p in "qkv"])
                for x, y in [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")]:
                    oc[f"{b}{y}.{w}"] = sd[f"{a}{x}.{w}"]
    e = "vision_model.embeddings."
    oc.update({"visual.conv1.weight": sd[e + "patch_embedding.weight"],
               "visual.class_embedding": sd[e + "class_embedding"],
               "visual.positional_embedding": sd[e + "position_embedding.weight"],
               "visual.proj": sd["visual_projection.weight"].t(),
               "text_projection": sd["text_projection.weight"].t(),
               "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
               "positional_embedding": sd["text_model.embeddings.position_embedding.weight"]})
    for x, y in [("vision_model.pre_layrnorm", "visual.ln_pre"),
                 ("vision_model.post_layernorm", "visual.ln_post"),
                 ("text_model.final_layer_norm", "ln_final")]:
        for w in ("weight", "bias"):
            oc[f"{y}.{w}"] = sd[f"{x}.{w}"]
    hps = tmp_path / "hps"
    shutil.copytree(d, hps)
    for f in os.listdir(hps):
        if f.endswith(".safetensors"):
            os.remove(hps / f)  # only the open_clip checkpoint holds weights now
    torch.save({"state_dict": oc}, hps / rewards.HPS_FILE)
    r = rewards.load(f"hpsv2={hps}")(images, prompts)
    assert torch.allclose(r, out.logits_per_image.diagonal() / model.logit_scale.exp(), atol=1e-5)


def test_reward_mixture_weights_and_bad_specs():
    import rewards
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 32, generator=g)
    kb = rewards.jpeg_incompressibility(images)
    mix = rewards.load("jpeg_compressibility:1,jpeg_incompressibility:3")  # (-kb + 3 kb) / 4
    assert torch.allclose(mix(images, [""] * 3), kb / 2, atol=1e-6)
    prompts = ["a red cat", "a blue dog", "a green car"]
    both = rewards.load("color:2,jpeg:1")
    want = (2 * rewards.color(images, prompts) - kb) / 3
    assert torch.allclose(both(images, prompts), want, atol=1e-6)
    for bad, says in [("nope", "unknown reward"), ("color:x", "bad weight"),
                      ("color:-1", "positive"), ("color:0", "positive"), ("", "empty"),
                      (" , ", "empty"), ("color=some/model", "no model")]:
        with pytest.raises(ValueError, match=says):
            rewards.load(bad)


@pytest.mark.slow
def test_reward_offline_error_names_the_model(tmp_path):
    """No network: the first call (or --time) stops with one line naming the model id."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for spec, model_id in [("clipscore", "openai/clip-vit-large-patch14"),
                           ("pickscore", "yuvalkirstain/PickScore_v1"),
                           ("geneval", "facebook/mask2former-swin-small-coco-instance"),
                           ("hpsv2", "xswu/HPSv2/HPS_v2.1_compressed.pt"),
                           ("imagereward", "THUDM/ImageReward")]:
        r = subprocess.run([sys.executable, "rewards.py", "--time", spec], cwd=HERE, env=env,
                           capture_output=True, text=True, timeout=120)
        lines = r.stderr.strip().splitlines()
        assert (r.returncode == 2 and len(lines) == 1 and model_id in lines[0]
                and "network" in lines[0]), r.stderr
    r = subprocess.run([sys.executable, "rewards.py", "--list"], cwd=HERE, capture_output=True,
                       text=True)
    assert r.returncode == 0 and all(n in r.stdout for n in ["ocr", "pickscore", "hpsv2",
                                                             "geneval_partial", "aesthetic",
                                                             "imagereward"])


def _det(cls, box, score=0.95):
    return {"class": cls, "score": score, "box": box, "mask": None}


def _geneval(dets, meta, colours=None):
    import rewards
    objects = rewards.geneval_select(dets, meta.get("tag"))
    return rewards.geneval_check(objects, meta,
                                 lambda c, ds: [colours[id(d)] for d in ds] if colours else [])


def test_geneval_counting():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 3}],
            "exclude": [{"class": "dog", "count": 4}]}
    dogs = [_det("dog", (10 * i, 0, 10 * i + 8, 8)) for i in range(5)]
    assert _geneval(dogs[:3], meta)[0]
    assert not _geneval(dogs[:2], meta)[0]                              # too few
    ok, why = _geneval(dogs[:4], meta)
    assert not ok and "dog < 4" in why                                  # too many
    assert not _geneval(dogs[:2] + [_det("dog", (60, 0, 68, 8), 0.5)],
                        meta)[0]                                        # counting needs 0.9
    assert _geneval(dogs[:3] + [_det("cat", (0, 20, 8, 28))], meta)[0]  # other classes do not count


def test_geneval_position():
    meta = {"tag": "position",
            "include": [{"class": "bench", "count": 1},
                        {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    bench = _det("bench", (60, 40, 90, 60))
    assert _geneval([bench, _det("dog", (0, 40, 30, 60))], meta)[0]
    assert not _geneval([bench, _det("dog", (95, 40, 120, 60))], meta)[0]  # right of it
    assert not _geneval([bench, _det("dog", (50, 40, 80, 60))], meta)[0]   # overlapping: no
                                                                           # clear relation
    assert not _geneval([_det("dog", (0, 40, 30, 60))], meta)[0]           # no target
    assert not _geneval([bench, _det("dog", (0, 40, 30, 60), 0.2)], meta)[0]  # below 0.3 confidence
    import rewards
    assert rewards.relative_position((0, 0, 10, 10), (0, 50, 10, 60)) == {"above"}
    assert rewards.relative_position((40, 40, 50, 50), (0, 0, 10, 10)) == {"right of", "below"}


def test_geneval_colour_attribution():
    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}]}
    car, bench = _det("car", (0, 0, 10, 10)), _det("bench", (20, 0, 30, 10))
    assert _geneval([car, bench], meta, {id(car): "red", id(bench): "blue"})[0]
    ok, why = _geneval([car, bench], meta, {id(car): "blue", id(bench): "red"})
    assert not ok and "red car" in why and "blue bench" in why            # colours swapped
    assert not _geneval([car], meta, {id(car): "red"})[0]                  # the bench is missing


def test_geneval_detector_code_path(tiny_clip, tmp_path):
    """The transformers Mask2Former path on a tiny random detector whose class head is forced to
    'dog': dogs are found (boxes inside the image), cats are not, colours come from CLIP."""
    import rewards
    from transformers import (Mask2FormerConfig, Mask2FormerForUniversalSegmentation,
                              Mask2FormerImageProcessor, SwinConfig)
    torch.manual_seed(0)
    names = ["person", "dog", "cat", "bench"]
    cfg = Mask2FormerConfig(
        backbone_config=SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1] * 4,
                                   num_heads=[1] * 4, window_size=4,
                                   out_features=["stage1", "stage2", "stage3", "stage4"]),
        hidden_dim=32, feature_size=32, mask_feature_dim=32, num_queries=8, encoder_layers=1,
        decoder_layers=2, encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2,
        common_stride=4, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})
    det = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        det.class_predictor.weight.zero_()
        det.class_predictor.bias.fill_(-10).index_fill_(0, torch.tensor([1]),
                                                        10.0)  # always 'dog'
    det.save_pretrained(tmp_path)
    Mask2FormerImageProcessor(size={"shortest_edge": 64,
                                    "longest_edge": 64}).save_pretrained(tmp_path)
    fn = rewards.GenEval(str(tmp_path), clip_id=tiny_clip[0])
    images = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    dets = fn.detect(images)
    assert all(d and all(x["class"] == "dog" and x["score"] > 0.3 for x in d) for d in dets)
    assert all(0 <= x["box"][0] < x["box"][2] <= 48 and 0 <= x["box"][1] < x["box"][3] <= 48
               for d in dets for x in d)
    want_dog = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    want_cat = {"tag": "single_object", "include": [{"class": "cat", "count": 1}]}
    r = fn(images, ["a photo of a dog", "a photo of a cat"], [want_dog, want_cat])
    assert r.tolist() == [1.0, 0.0]
    colours = fn.colours(images[0], "dog", dets[0])
    assert len(colours) == len(dets[0]) and set(colours) <= set(rewards.GENEVAL_COLORS)
    with pytest.raises(ValueError, match="GenEval metadata"):
        fn(images, ["a dog", "a cat"], [{}, {}])


def test_ocr_target_and_score_follow_flow_grpo():
    """Flow-GRPO reads the text between the first two straight double quotes and gives full
    reward when it appears inside the text read. Curly quotes next; single quotes last, and
    never an apostrophe."""
    assert rewards.ocr_target('A bird\'s-eye view with "poona" near the tower\'s top') == "poona"
    assert rewards.ocr_target('a mug saying \u201cgood morning\u201d') == "good morning"
    assert rewards.ocr_target("the dog's bowl with 'bone' on it") == "bone"
    assert rewards.ocr_target('"first" then \u201csecond\u201d') == "first"
    with pytest.raises(ValueError, match="no quoted text"):
        rewards.ocr_target("a bird's-eye view of the tower's top")
    assert rewards.ocr_score("Welcome to the POONA shop", "poona") == 1.0  # inside the read text
    assert rewards.ocr_score("poona", "Poo Na") == 1.0  # case and spaces ignored
    assert rewards.ocr_score("pona", "poona") == pytest.approx(0.8)  # one edit of five
    assert rewards.ocr_score("", "poona") == 0.0 and rewards.ocr_score("x" * 40, "poona") == 0.0


def test_missing_package_error_names_the_real_cause():
    with pytest.raises(rewards.RewardError, match="No module named 'no_such_module_xyz'"):
        rewards._package("demo", "no_such_module_xyz", "no-such-package")


def test_geneval_threshold_is_strict_as_geneval():
    meta = {"tag": "single_object", "include": [{"class": "dog", "count": 1}]}
    assert not _geneval([_det("dog", (0, 0, 8, 8), rewards.THRESHOLD)],
                        meta)[0]  # GenEval keeps score > 0.3
    assert _geneval([_det("dog", (0, 0, 8, 8), rewards.THRESHOLD + 1e-6)], meta)[0]


def test_geneval_partial_score_as_flow_grpo():
    """Flow-GRPO's partial score, by hand: one term per clause, averaged."""
    def partial(dets, meta, colours=None):
        objects = rewards.geneval_select(dets, meta.get("tag"))
        return rewards.geneval_partial(objects, meta, lambda c, ds: [colours[id(d)] for d in ds])
    dogs = [_det("dog", (10 * i, 0, 10 * i + 8, 8)) for i in range(5)]
    count = {"tag": "counting", "include": [{"class": "dog", "count": 3}],
             "exclude": [{"class": "dog", "count": 4}]}
    assert partial(dogs[:3], count) == 1.0
    assert (partial(dogs[:2], count) == pytest.approx(2 / 3)
            and partial(dogs[:5], count) == pytest.approx(1 / 3))
    car, bench = _det("car", (0, 0, 10, 10)), _det("bench", (20, 0, 30, 10))
    attr = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bench", "count": 1, "color": "blue"}]}
    assert (partial([car, bench], attr, {id(car): "red", id(bench): "green"})
            == pytest.approx(3 / 4))  # 1, 1, 1, 0
    assert (partial([car], attr, {id(car): "red"})
            == pytest.approx(2 / 4))  # the bench: count 0 and colour 0
    pos = {"tag": "position", "include": [{"class": "bench", "count": 1},
                                          {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    b = _det("bench", (60, 40, 90, 60))
    assert partial([b, _det("dog", (0, 40, 30, 60))], pos) == 1.0
    assert (partial([b, _det("dog", (95, 40, 120, 60))], pos)
            == pytest.approx(2 / 3))  # 1, 1, position 0
    assert (partial([_det("dog", (0, 40, 30, 60))], pos)
            == pytest.approx(1 / 3))  # no bench: 0; dog 1; no target 0


def test_geneval_maps_detector_classes_by_index():
    """GenEval names detections by class index (its object_names.txt, COCO order): an 80-class
    head whose label file spells 'sofa' or 'tvmonitor' still yields 'couch' and 'tv'. Other
    heads map by name, aliases applied."""
    darknet = dict(enumerate(rewards.GENEVAL_CLASSES))
    darknet.update({57: "sofa", 62: "tvmonitor", 64: "mouse", 65: "remote", 66: "keyboard",
                    3: "motorbike"})
    names = rewards.geneval_classes(darknet)
    assert (names == rewards.GENEVAL_CLASSES and names[57] == "couch"
            and names[64] == "computer mouse")
    assert rewards.geneval_classes({0: "person", 1: "sofa", 2: "potted_plant",
                                    3: "tv-monitor"}) == ["person", "couch", "potted plant", "tv"]


def test_geneval_colour_crops_get_the_clip_transform(tiny_clip):
    """Each detection's crop (grey #999 outside its mask, cut to its box) goes through CLIP's own
    transform, short side to the input size (bicubic) then a centre crop: not squashed."""
    g = rewards.GenEval("unused", clip_id=tiny_clip[0])
    g.clip.load()
    image = torch.rand(3, 48, 48, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[10:40, 4:20] = True
    det = {"box": (4, 10, 20, 40), "mask": mask}  # 16 wide, 30 tall
    px = g.crops(image, [det])
    crop = torch.where(mask, image, torch.full_like(image, 0.6))[None, :, 10:40, 4:20]
    want = rewards.clip_pixels(crop, g.clip.size, g.clip.mean, g.clip.std)
    assert px.shape == (1, 3, g.clip.size, g.clip.size) and torch.allclose(px, want)
    squashed = torch.nn.functional.interpolate(crop, size=(g.clip.size,) * 2, mode="bilinear")
    assert not torch.allclose(px, rewards.clip_pixels(squashed, g.clip.size, g.clip.mean,
                                                      g.clip.std), atol=1e-3)


def test_geneval_export_is_read_as_geneval_reads_it(tmp_path):
    """export_geneval's layout read back the way GenEval's evaluate_images.py walks it: numeric
    folders, metadata.jsonl one JSON object, samples/<5 digits>.png."""
    import re
    from PIL import Image
    metas = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}],
              "prompt": "a photo of a cat"},
             {"tag": "counting", "include": [{"class": "dog", "count": 2}],
              "prompt": "a photo of two dogs"}]
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rewards.export_geneval(str(tmp_path), [metas[0]] * 2 + [metas[1]] * 2, [0, 0, 1, 1],
                           [0, 1, 0, 1], images)
    found = {}
    for sub in sorted(os.listdir(tmp_path)):
        assert sub.isdigit()
        meta = json.load(open(tmp_path / sub / "metadata.jsonl"))
        files = sorted(f for f in os.listdir(tmp_path / sub / "samples")
                       if re.match(r"\d+\.png", f))
        found[meta["prompt"]] = [Image.open(tmp_path / sub / "samples" / f).size for f in files]
    assert found == {"a photo of a cat": [(16, 16)] * 2, "a photo of two dogs": [(16, 16)] * 2}


def test_built_in_prompt_sets():
    from opd_support import prompts
    train, val, test, meta = prompts.builtin("geneval")
    assert len(train) > 2000 and len(test) > 100 and len(val) > 100
    assert not set(train) & set(test) and not set(train) & set(val) and not set(val) & set(test)
    train = train + val
    tags = {meta[p]["tag"] for p in train + test}
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for p in train + test:  # every prompt is GenEval's template on its metadata
        m = meta[p]
        inc = m["include"]
        assert m["prompt"] == p and all(i["class"] in rewards.GENEVAL_CLASSES for i in inc)
        if m["tag"] == "counting":
            assert p == (f"a photo of {prompts.NUMBERS[inc[0]['count']]} "
                         f"{prompts.plural(inc[0]['class'])}")
            assert m["exclude"] == [{"class": inc[0]["class"], "count": inc[0]["count"] + 1}]
        if m["tag"] == "position":
            assert p == f"a photo of {prompts.with_article(inc[1]['class'])} " \
                        f"{inc[1]['position'][0]} " \
                        f"{prompts.with_article(inc[0]['class'])}" and inc[1]["position"][1] == 0
        if "color" in inc[0]:
            assert all(i["class"] != "person" and i["color"] in rewards.GENEVAL_COLORS for i in inc)
    assert ("a photo of an airplane" in train + test
            and "a photo of three benchs" in train + test)  # GenEval's plural rule
    for task in ("ocr", "aesthetic"):
        tr, va, te, _ = prompts.builtin(task)
        assert (len(tr) > 1000 and len(te) > 50 and len(va) > 50 and not set(tr) & set(te)
                and not set(va) & (set(tr) | set(te)) and prompts.builtin(task)[0] == tr)
    assert all(rewards.ocr_target(p) for p in prompts.builtin("ocr")[0])


def _imagereward_reference(sd, cfg, px, ids, mask):
    """ImageReward's score written from its package's structure (timm ViT, BLIP's BERT with
    cross-attention, the MLP, the normalisation), on the checkpoint's raw tensors."""
    import torch.nn.functional as F
    W = lambda k: sd[k + ".weight"]
    lin = lambda x, k: F.linear(x, W(k), sd[k + ".bias"])
    ln = lambda x, k, eps: F.layer_norm(x, x.shape[-1:], W(k), sd[k + ".bias"], eps)

    def attention(q, k, v, heads, add=0.0):
        B, N, D = q.shape
        split = lambda t: t.reshape(B, -1, heads, D // heads).transpose(1, 2)
        a = (split(q) @ split(k).transpose(-1, -2) / (D // heads) ** 0.5 + add).softmax(-1)
        return (a @ split(v)).transpose(1, 2).reshape(B, N, D)
    v = "blip.visual_encoder."
    x = F.conv2d(px, W(v + "patch_embed.proj"), sd[v + "patch_embed.proj.bias"],
                 stride=cfg["patch"])
    x = torch.cat([sd[v + "cls_token"].expand(len(px), -1, -1), x.flatten(2).transpose(1, 2)],
                  1) + sd[v + "pos_embed"]
    for i in range(cfg["vision_layers"]):
        b = f"{v}blocks.{i}."
        q, k, vv = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, -1)
        x = x + lin(attention(q, k, vv, cfg["vision_heads"]), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(x, v + "norm", 1e-6)
    t = "blip.text_encoder."
    h = ln(W(t + "embeddings.word_embeddings")[ids] +
           W(t + "embeddings.position_embeddings")[: ids.shape[1]],
           t + "embeddings.LayerNorm", 1e-12)
    pad = ((1.0 - mask[:, None, None, :].float()) * -10000.0)
    for i in range(cfg["text_layers"]):
        l = f"{t}encoder.layer.{i}."
        for part, kv, add in [("attention.", h, pad), ("crossattention.", img, 0.0)]:
            s = l + part + "self."
            a = attention(lin(h, s + "query"), lin(kv, s + "key"), lin(kv, s + "value"),
                          cfg["text_heads"], add)
            h = ln(lin(a, l + part + "output.dense") + h, l + part + "output.LayerNorm", 1e-12)
        h = ln(lin(F.gelu(lin(h, l + "intermediate.dense")), l + "output.dense") + h,
               l + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):  # the MLP's Linear layers (Dropout between, no activation)
        r = lin(r, f"mlp.layers.{j}")
    return (r[:, 0] - rewards.IMAGEREWARD_NORM[0]) / rewards.IMAGEREWARD_NORM[1]


def test_imagereward_checkpoint_on_transformers_blip(tmp_path):
    """A tiny random checkpoint in ImageReward's layout (ImageReward.pt: blip.visual_encoder.*,
    blip.text_encoder.*, mlp.layers.*, names from its package's source), med_config.json and a
    BERT tokenizer: the reward loads it into transformers' BLIP and scores as the reference."""
    from transformers import BertTokenizer
    g = torch.Generator().manual_seed(0)
    r = lambda *s: 0.2 * torch.randn(*s, generator=g)
    Dv, Dt, V = 32, 32, 40
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "the",
             "left", "photo", "of"]
    (tmp_path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(V - len(words))])
                                        + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    cfg = {"patch": 16, "vision_layers": 1, "vision_heads": 1, "text_layers": 2, "text_heads": 2}
    sd, v, t = {}, "blip.visual_encoder.", "blip.text_encoder."
    sd.update({v + "patch_embed.proj.weight": r(Dv, 3, 16, 16), v + "patch_embed.proj.bias": r(Dv),
               v + "cls_token": r(1, 1, Dv), v + "pos_embed": r(1, 5, Dv)})
    lin = lambda k, o, i: sd.update({k + ".weight": r(o, i), k + ".bias": r(o)})
    norm = lambda k, d: sd.update({k + ".weight": 1 + r(d), k + ".bias": r(d)})
    b = v + "blocks.0."
    norm(b + "norm1", Dv)
    lin(b + "attn.qkv", 3 * Dv, Dv)
    lin(b + "attn.proj", Dv, Dv)
    norm(b + "norm2", Dv)
    lin(b + "mlp.fc1", 4 * Dv, Dv); lin(b + "mlp.fc2", Dv, 4 * Dv); norm(v + "norm", Dv)
    sd.update({t + "embeddings.word_embeddings.weight": r(V, Dt),
               t + "embeddings.position_embeddings.weight": r(40, Dt),
               t + "embeddings.position_ids": torch.arange(40)[None]})
    norm(t + "embeddings.LayerNorm", Dt)
    for i in range(2):
        l = f"{t}encoder.layer.{i}."
        for part, kv in [("attention.", Dt), ("crossattention.", Dv)]:
            lin(l + part + "self.query", Dt, Dt)
            lin(l + part + "self.key", Dt, kv)
            lin(l + part + "self.value", Dt, kv)
            lin(l + part + "output.dense", Dt, Dt); norm(l + part + "output.LayerNorm", Dt)
        lin(l + "intermediate.dense", 64, Dt)
        lin(l + "output.dense", Dt, 64)
        norm(l + "output.LayerNorm", Dt)
    for j, (o, i) in zip((0, 2, 4, 6, 7), [(1024, Dt), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        lin(f"mlp.layers.{j}", o, i)
    sd.update({"blip.vision_proj.weight": r(8, Dv),
               "blip.vision_proj.bias": r(8)})  # unused by the score
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(dict(
        vocab_size=V, hidden_size=Dt, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=40, layer_norm_eps=1e-12, encoder_width=Dv,
        hidden_act="gelu", add_cross_attention=True)))
    fn = rewards.load(f"imagereward={tmp_path}")
    images = torch.rand(3, 3, 48, 40, generator=g)
    prompts_ = ["a red cat", "a photo of a dog on the left", "the cat"]
    got = fn(images, prompts_)
    tok = BertTokenizer.from_pretrained(tmp_path)(prompts_, padding="max_length", truncation=True,
                                                  max_length=35, return_tensors="pt")
    px = rewards.clip_pixels(images, 32, rewards.CLIP_MEAN, rewards.CLIP_STD)
    with torch.no_grad():
        want = _imagereward_reference(sd, cfg, px, tok.input_ids, tok.attention_mask)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    assert got.std() > 0


def test_prompt_sets_piped_into_head_end_quietly():
    r = subprocess.run(f"{sys.executable} -m opd_support.prompts ocr train | head -3", shell=True,
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3 and r.stderr == "", r.stderr

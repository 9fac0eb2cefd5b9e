"""
The tasks of opd.py: a name, train and test prompts (and GenEval metadata), the rewards
(rewards.py). Built-in prompt sets of the real tasks, so that `python opd.py --task
geneval|ocr|aesthetic` runs without a prompt file, and the reading of prompt files (--prompts,
--test_prompts); the toy tasks' prompts are tiny.py's.

  geneval    GenEval-style prompts with their metadata, from GenEval's templates, its 80 COCO
             class names and 10 colours: single object, two objects, counting (2-4), colours,
             relative position, colour attribution (the six tags of GenEval's suite).
  ocr        quoted-text prompts: a scene template and one to three words of a word list.
  aesthetic  subject + setting + style prompts.

Each set is generated deterministically (fixed seed); a prompt goes to the test split when a
hash of its text says so (about 1 in 10), so train and test never share a prompt. GenEval's
official evaluation metadata stays an option: --test_prompts evaluation_metadata.jsonl (then
any train prompt it contains is dropped from the train split).
"""
import dataclasses
import json
import re
import zlib

import torch

from opd_support.machinery import rng
from opd_support.options import UserError

TOY_TASKS = ("color", "position", "jpeg",  # the control: three tasks that pull the same way
             "vivid", "faded", "exact")    # two that oppose, one sparse (tiny.py)
REAL_TASKS = {  # task -> (training reward, evaluation reward)
    "geneval": ("geneval_partial", "geneval"), "ocr": ("ocr", "ocr"),
    "aesthetic": ("pickscore:1,clipscore:1,hpsv2:1",) * 2}


@dataclasses.dataclass
class Task:
    name: str
    train: list
    test: list
    reward: object  # fn(images (B,3,H,W) in [0,1], prompts, metadata) -> (B,): training reward
    meta: dict = dataclasses.field(default_factory=dict)  # prompt -> GenEval metadata
    eval_reward: object = None  # the reported metric, when it is not the training reward
    val: list = dataclasses.field(default_factory=list)  # validation prompts (selection)


def task_file(spec, task):
    """The prompt file of a task from --prompts / --test_prompts: FILE (every task's) or
    TASK=FILE pairs ('' when the task has none)."""
    if "=" not in spec:
        return spec
    items = (i.partition("=") for i in spec.split(",") if i.strip())
    return {k.strip(): v.strip() for k, _, v in items}.get(task, "")


def make_task(name, cfg, device="cpu"):
    """A task's prompts (toy: tiny.py; real: --prompts / --test_prompts or the built-in sets) in
    train, validation and test splits that share no prompt, and its rewards, loaded now, so that
    missing weights stop a run before it trains."""
    import rewards
    from opd_support import tiny
    train_file, test_file = task_file(cfg.prompts, name), task_file(cfg.test_prompts, name)
    if name in TOY_TASKS:
        (train, val, test), meta = tiny.toy_prompts(name, cfg.toy_wording), {}
    elif train_file:  # every 10th prompt a test prompt, every 10th from the 6th a validation one
        prompts, meta = read(train_file)
        train, val, test = [p for i, p in enumerate(prompts) if i % 5], prompts[5::10], \
            prompts[::10]
    else:
        train, val, test, meta = builtin(name)
    if name not in TOY_TASKS and test_file:
        test, more = read(test_file)
        meta.update(more)
        held = set(test)
        train, val = [p for p in train if p not in held], [p for p in val if p not in held]
        if not train:
            raise UserError(f"every train prompt of {name} is among the test prompts of "
                            f"{test_file}")
    if name == "geneval" and not cfg.reward and any(p not in meta for p in train + val + test):
        raise UserError("--task geneval needs GenEval metadata: --prompts a jsonl with one "
                        '{"prompt": ..., "tag": ..., "include": [...]} a line')
    specs = ((cfg.reward,) * 2 if cfg.reward
             else (name,) * 2 if name in TOY_TASKS else REAL_TASKS[name])
    try:
        reward = rewards.load(specs[0], device, eager=True)
        eval_reward = reward if specs[1] == specs[0] else rewards.load(specs[1], device, eager=True)
        if "ocr" in re.split(r"[,:=]", specs[0]):
            for p in train + val + test:
                rewards.ocr_target(p)  # every OCR prompt quotes the text to render
    except (ValueError, rewards.RewardError) as e:  # a bad spec, prompt or missing weights
        raise UserError(str(e)) from None
    return Task(name, train, test, reward, meta, eval_reward, val)


def score(task, images, prompts, evaluation=False):
    """The task's reward (its reported metric when evaluation) of images for their prompts."""
    fn = task.eval_reward if evaluation and task.eval_reward is not None else task.reward
    return fn(images, prompts, [task.meta.get(p, {}) for p in prompts]).float().cpu()


def draw_prompts(cfg, task, draw, index, n):
    """The n train prompts of draw number `draw` (stage 2: the round; stage 1: the epoch) of the
    task with this index: positions draw n .. draw n + n - 1 of an endless walk through the
    train prompts, a fresh random order each pass (epoch), so that no prompt repeats within an
    epoch. The same on every rank, a function of (seed, draw): a resumed run draws what an
    uninterrupted one would."""
    N, out, order = len(task.train), [], {}
    for pos in range(draw * n, draw * n + n):
        epoch, k = divmod(pos, N)
        if epoch not in order:
            order[epoch] = torch.randperm(N, generator=rng(cfg.seed, "prompts", index,
                                                           step=epoch))
        out.append(task.train[order[epoch][k]])
    return out


def read(path):
    """A prompt file: text (one prompt a line) or GenEval metadata jsonl ({"prompt": ...} a line;
    a line with a tag, include or exclude is checked as GenEval's metadata, geneval_problem).
    Returns (prompts, {prompt: metadata}); one line naming the file (and line) when it cannot be
    read, is not UTF-8 text, is empty, or a line is not of its kind."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise UserError(f"cannot read prompt file {path!r}: {why}") from None
    prompts, meta, jsonl = [], {}, path.endswith(".jsonl")
    for i, line in ((i, l.strip()) for i, l in enumerate(lines, 1)):
        if not line:
            continue
        m = json_object(line) if jsonl or line.startswith("{") else None
        if not jsonl:
            if isinstance(m, dict) and "prompt" in m:
                raise UserError(f"{path}:{i} is a JSON object, not a prompt: name a GenEval "
                                f"metadata file .jsonl")
            prompts.append(line)
            continue
        if not isinstance(m, dict) or not isinstance(m.get("prompt"), str) or \
                not m["prompt"].strip():
            raise UserError(f'{path}:{i} is not a JSON object with a "prompt": {line[:60]!r}')
        why = geneval_problem(m) if {"tag", "include", "exclude"} & set(m) else None
        if why:
            raise UserError(f"{path}:{i} is not GenEval metadata: {why}")
        prompts.append(m["prompt"]); meta[m["prompt"]] = m
    if not prompts:
        raise UserError(f"prompt file {path} is empty")
    return prompts, meta


def json_object(line):
    try:
        return json.loads(line)
    except ValueError:
        return None


# ---------------------------------------------------------------------------------- GenEval
def with_article(name):
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"  # GenEval's rule


def plural(name):
    return f"{name}es" if name.endswith("s") else f"{name}s"  # GenEval's rule


NUMBERS = ["zero", "one", "two", "three", "four"]
RELATIONS = ["left of", "right of", "above", "below"]
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def geneval_problem(m):
    """Why a record is not GenEval metadata as the GenEval reward reads it, or None: a tag of
    GenEval's six, a non-empty include list and an exclude list of clauses with a class of its 80
    and a count >= 1; an include clause's colour among its 10, its position [relation, the index
    of an earlier clause]."""
    from rewards import GENEVAL_CLASSES, GENEVAL_COLORS
    include, exclude = m.get("include"), m.get("exclude", [])
    if m.get("tag") not in TAGS:
        return f"its tag {m.get('tag')!r} is none of {', '.join(TAGS)}"
    if not isinstance(include, list) or not include or not isinstance(exclude, list):
        return "it needs a non-empty include list (and exclude, when given, a list)"
    for i, c in enumerate(include + exclude):
        name = f"include[{i}]" if i < len(include) else f"exclude[{i - len(include)}]"
        if not isinstance(c, dict) or c.get("class") not in GENEVAL_CLASSES:
            return f"{name} has no class among GenEval's 80"
        if type(c.get("count")) is not int or c["count"] < 1:
            return f"{name}'s count {c.get('count')!r} is not an integer >= 1"
        if "color" in c and c["color"] not in GENEVAL_COLORS:
            return f"{name}'s color {c['color']!r} is none of {', '.join(GENEVAL_COLORS)}"
        pos = c.get("position")
        if pos is not None and not (i < len(include) and isinstance(pos, list) and len(pos) == 2
                                    and pos[0] in RELATIONS and type(pos[1]) is int
                                    and 0 <= pos[1] < i):
            return f"{name}'s position {pos!r} is not [relation, index of an earlier clause]"
    return None


def geneval(n=1000, seed=0):
    """GenEval-style metadata dicts: every single-object, counting (2-4) and colour prompt, and n
    sampled two-object, position and colour-attribution prompts. Colour prompts never name a
    person (as GenEval). Metadata as GenEval's: tag, include [{class, count, color?, position?}],
    exclude (counting), prompt."""
    from rewards import GENEVAL_CLASSES as C, GENEVAL_COLORS as K
    g = torch.Generator().manual_seed(seed)
    pick = lambda k, m: torch.randperm(m, generator=g)[:k].tolist()
    things = [c for c in C if c != "person"]
    out = [dict(tag="single_object", include=[{"class": c, "count": 1}],
                prompt=f"a photo of {with_article(c)}") for c in C]
    out += [dict(tag="counting", include=[{"class": c, "count": k}],
                 exclude=[{"class": c, "count": k + 1}],
                 prompt=f"a photo of {NUMBERS[k]} {plural(c)}") for c in C for k in (2, 3, 4)]
    out += [dict(tag="colors", include=[{"class": c, "count": 1, "color": k}],
                 prompt=f"a photo of {with_article(k)} {c}")
            for c in things for k in K]
    for _ in range(n):
        a, b = pick(2, len(C))
        out.append(dict(tag="two_object",
                        include=[{"class": C[a], "count": 1}, {"class": C[b], "count": 1}],
                        prompt=f"a photo of {with_article(C[a])} and {with_article(C[b])}"))
        a, b = pick(2, len(C))
        rel = RELATIONS[pick(1, 4)[0]]
        out.append(dict(tag="position", include=[{"class": C[b], "count": 1},
                                                 {"class": C[a], "count": 1, "position": [rel, 0]}],
                        prompt=f"a photo of {with_article(C[a])} {rel} {with_article(C[b])}"))
        (a, b), (ka, kb) = pick(2, len(things)), pick(2, len(K))
        out.append(dict(tag="color_attr",
                        include=[{"class": things[a], "count": 1, "color": K[ka]},
                                 {"class": things[b], "count": 1, "color": K[kb]}],
                        prompt=f"a photo of {with_article(K[ka])} {things[a]} and "
                               f"{with_article(K[kb])} {things[b]}"))
    return list({m["prompt"]: m for m in out}.values())  # de-duplicated, first kept


# ---------------------------------------------------------------------------------- OCR
SCENES = [
    'a wooden sign by a forest trail that reads "{}"', 'a neon sign in a dark alley saying "{}"',
    'a chalkboard menu outside a cafe with "{}" written on it',
    'a t-shirt printed with the words "{}"',
    'a vintage book cover titled "{}"', 'a birthday cake with "{}" written in icing',
    'a street banner over a busy road that says "{}"', 'a coffee mug with "{}" printed on it',
    'a handwritten note on a desk that says "{}"', 'a billboard on a highway with the slogan "{}"',
    'a movie poster with the title "{}"', 'a shop window with "{}" painted in gold letters',
    'a license plate that reads "{}"', 'a cardboard box stamped with "{}"',
    'a protest sign held up in a crowd that says "{}"', 'a road sign in the desert reading "{}"',
    'a graffiti wall with "{}" sprayed in bright colours', 'a bakery storefront called "{}"',
    'a greeting card that says "{}"', 'a computer screen showing the word "{}"',
    'a sand beach with "{}" written in the sand', 'a glowing hologram spelling "{}"',
    'a wooden crate labelled "{}"', 'a notebook cover with "{}" on it',
]
WORDS = """hello world open closed sale welcome home coffee bakery garden river ocean mountain
sunrise sunset forest library museum station market harbor bridge castle village city night morning
summer winter autumn spring dream hope love peace joy freedom future past stay calm keep going
fresh bread hot soup cold drinks fast food free wifi no parking exit enter push pull danger quiet
please thank you good luck happy birthday best wishes grand opening last chance new arrivals
music dance party festival cinema theater gallery studio workshop factory office school college
apple banana cherry lemon mango orange peach pepper tomato potato carrot onion garlic honey sugar
salt tea milk juice water fire earth wind storm thunder rain snow cloud star moon sun planet rocket
robot dragon tiger eagle wolf bear fox owl whale shark turtle rabbit horse zebra lion""".split()


def ocr(n=4000, seed=0):
    """n prompts asking for one to three words of WORDS, quoted, in a scene of SCENES."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = 1 + int(torch.randint(3, (), generator=g))
        words = " ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist())
        out.append(SCENES[int(torch.randint(len(SCENES), (), generator=g))]
                   .format(words.title() if k > 1 else words))
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------------------- aesthetic
SUBJECTS = ["an old fisherman mending a net", "a red fox in fresh snow",
            "a lighthouse on a rocky coast", "a bowl of ramen", "a cat asleep on a windowsill",
            "a mountain lake at dawn", "a busy night market", "a dancer mid-leap",
            "a vintage car on a desert road", "a field of sunflowers", "a gothic cathedral",
            "a hummingbird at a flower", "a cozy reading nook", "a waterfall in a jungle",
            "a city skyline in rain", "a child flying a kite", "a steaming cup of tea",
            "an astronaut on a quiet planet", "a koi pond", "a snowy village at night",
            "a wolf howling at the moon", "a sailing ship in a storm", "a bouquet of peonies",
            "a desert canyon", "a street musician", "a castle on a hill", "a bamboo forest",
            "a portrait of a young woman with freckles", "a steam train on a viaduct",
            "an owl on a branch", "a tropical beach at sunset", "a bustling train station",
            "a glass of red wine"]
SETTINGS = ["at golden hour", "in soft morning light", "under a starry sky", "in thick fog",
            "after rain", "in autumn", "in spring bloom", "at blue hour", "lit by candles",
            "in winter", "on a summer afternoon"]
STYLES = ["cinematic photograph, 35mm", "oil painting", "watercolor illustration",
          "studio photograph, 85mm", "digital art, highly detailed", "ink sketch", "pastel drawing",
          "matte painting", "film photograph, grain", "ukiyo-e print", "low-poly 3D render",
          "impressionist painting"]


def aesthetic(n=3000, seed=0):
    """n prompts: a subject, a setting and a style, drawn at random."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (), generator=g))]
    return list(dict.fromkeys(f"{pick(SUBJECTS)} {pick(SETTINGS)}, {pick(STYLES)}"
                              for _ in range(n)))


# ---------------------------------------------------------------------------------- splits
def split_of(prompt):
    """A built-in prompt's split by a hash of its text: about 1 in 10 test, 1 in 10 val."""
    return {0: "test", 1: "val"}.get(zlib.crc32(prompt.encode()) % 10, "train")


def builtin(task):
    """(train, validation, test prompts, {prompt: metadata}) of a real task's built-in set."""
    if task == "geneval":
        metas = geneval()
        prompts, meta = [m["prompt"] for m in metas], {m["prompt"]: m for m in metas}
    else:
        prompts, meta = (ocr() if task == "ocr" else aesthetic()), {}
    return (*([p for p in prompts if split_of(p) == s] for s in ("train", "val", "test")), meta)


if __name__ == "__main__":
    import argparse
    import signal
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `python prompts.py ocr train | head` ends
                                                   # quietly
    ap = argparse.ArgumentParser(description="write a built-in prompt set (GenEval sets as "
                                             "metadata jsonl)")
    ap.add_argument("task", choices=["geneval", "ocr", "aesthetic"])
    ap.add_argument("split", choices=["train", "val", "test"])
    a = ap.parse_args()
    train, val, test, meta = builtin(a.task)
    for p in {"train": train, "val": val, "test": test}[a.split]:
        print(json.dumps(meta[p]) if meta else p)

"""
A training stage's life, around the loops of opd.py and baselines.py:

  preflight    the checks that need no model: every stage's options, the ranks split the batch,
               the teachers' and --lora's files, --resume continues the run its options name
  setup        processes, the run folder's lock, the tasks and the model
  start_run    the stage's folder (plan: fresh, resumed, continued to more steps, or done and
               reused), its trained adapter with AdamW and EMA (and a baseline's extra
               adapters), restored when resuming
  each_round, each_epoch   the steps of the loop, each after the validation (--eval_every) and
               with the text encoders' embeddings of the coming prompts made ahead
  optimizer_step   gradients averaged over the ranks, clipped, one step (non-finite: skipped)
  after_step   the bookkeeping after a step, none of it in the maths: EMA, counters, training
               seconds, the metrics row, the checkpoint when due, and at once on SIGTERM /
               SIGUSR1 (then the run stops, exit code 75); inside an RL epoch, a stop lands
               before its next update (stop_inside_epoch)
  finish_run   the ranks checked in sync, the EMA weights saved as the stage's LoRA
"""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import time

import torch

from opd_support import checkpoints as ck
from opd_support import conflict
from opd_support.config import parse_pairs, resolve
from opd_support.evaluation import validate
from opd_support.loras import LORA_FILE, adapter_state, check_lora, layout, run_info, save_lora
from opd_support.machinery import (EMA, Trackers, append_jsonl, average_gradients, bar, barrier,
                                   check_in_sync, compile_model, config_text, cost, dist_setup,
                                   guarded_step, rank_world, say, sum_over_ranks)
from opd_support.options import Stopped, UserError
from opd_support.prompts import draw_prompts, make_task
from opd_support.sd3 import SD3, add_lora, drop_adapters, load_pipeline


# ------------------------------------------------------------------------------ before the model
def task_names(cfg):
    if cfg.stage == "teacher":
        return [cfg.task]
    return list(parse_pairs(cfg.teachers)) if cfg.stage == "distill" and cfg.teachers else \
        cfg.tasks.split(",")


def teacher_dirs(cfg, tasks):
    """task -> teacher folder: --teachers, else <out>/teacher-<task>."""
    return parse_pairs(cfg.teachers) if cfg.teachers else \
        {t: os.path.join(cfg.out, f"teacher-{t}") for t in tasks}


def preflight(cfg, stages):
    """Checks that need no model, before one loads: every stage's options, the ranks split the
    batch, the teachers exist, and --resume keeps the model and LoRA of the run it continues."""
    world, tasks = rank_world()[1], task_names(cfg)
    for stage in stages:
        c = resolve(cfg, stage)
        if c.batch_size % world:
            raise UserError(f"--batch_size {c.batch_size} does not divide across {world} ranks")
        if stage == "distill" and "teacher" not in stages:  # the teachers must exist already
            for t, d in teacher_dirs(c, tasks).items():
                if not cfg.teachers and layout(d) is None:
                    raise UserError(f"no LoRA at {os.path.join(d, LORA_FILE)}: make it with "
                                    f"`python opd.py --stage teacher --task {t} --out {cfg.out}`")
                check_lora(d)  # a folder in either layout, or a hub id (fetched now)
        if stage == "eval":  # --lora's, now rather than after the stages that train
            for d in parse_pairs(c.lora).values():
                check_lora(d)
        names = {"teacher": [f"teacher-{t}" for t in tasks], "distill": [student_name(c)]}
        for name in names.get(stage, []):
            if plan(os.path.join(cfg.out, name), c, name)[0] == "resume":
                ck.check_resume(os.path.join(cfg.out, name), c)


def student_name(cfg):
    """Stage 2's folder: student, or student-<loss> for another loss."""
    return "student" if cfg.loss == "closed" else f"student-{cfg.loss}"


def setup(cfg, first_stage):
    """Processes, the lock of --out, tasks and the model, once every check has passed. Returns
    (model, tasks), the resolved config of the first stage printed."""
    rank, world, device = dist_setup(cfg.device)
    torch.manual_seed(cfg.seed)
    first = resolve(cfg, first_stage)
    tasks = [make_task(n, first, device) for n in task_names(cfg)]  # prompts, rewards: checked
    if rank == 0:
        take_lock(cfg.out)
    say(rank, config_text(first))
    model = SD3(load_pipeline(first, device, rank, world), first, device)
    if cfg.compile:
        compile_model(model.tr)
    return model, tasks


LOCK = "run.lock"


def take_lock(out):
    """One run per folder: <out>/run.lock holds the pid and host of the run using it. Another
    live run's lock stops this one with one line; a lock whose process is gone from this host is
    taken over with one line; the lock is removed when this process ends."""
    import atexit
    os.makedirs(out, exist_ok=True)
    path, me = os.path.join(out, LOCK), {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                held = json.load(open(path))
            except (OSError, ValueError):
                held = {}
            pid, host = held.get("pid"), held.get("host")
            if (pid, host) == (me["pid"], me["host"]):  # this process took it already
                return path
            if host == me["host"] and isinstance(pid, int) and not pid_alive(pid):
                print(f"warning: {path} was left by a run that is gone (pid {pid} on {host}): "
                      f"taken over", flush=True)
                os.remove(path)
                continue
            raise UserError(f"{out} is in use by another run (pid {pid} on host {host}, since "
                            f"{held.get('since', '?')}); wait for it, or use another --out "
                            f"(if that run is gone, delete {path})") from None
        with os.fdopen(fd, "w") as f:
            json.dump({**me, "since": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        atexit.register(release_lock, path, os.getpid())
        return path
    raise UserError(f"cannot take the lock {path}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_lock(path, pid):
    try:
        if json.load(open(path)).get("pid") == pid:
            os.remove(path)
    except (OSError, ValueError):
        pass


# ------------------------------------------------------------------------------ a stage's run
@dataclasses.dataclass
class Adapter:
    """A trained adapter besides the run's own (a baseline's fake score): its weights, AdamW
    and gradient clip."""
    params: list
    opt: torch.optim.Optimizer
    clip: float


@dataclasses.dataclass
class Run:
    """A training stage's state: its folder, the trained adapter (its weights, AdamW, EMA), the
    first optimizer step (0, or the checkpoint's when resumed) and the training seconds so far."""
    dir: str
    adapter: str
    params: list
    opt: torch.optim.Optimizer
    ema: EMA
    rank: int
    world: int
    start: int = 0
    step: int = 0                                      # optimizer steps done
    every: int = 1                                     # optimizer steps a round (RL: an epoch)
    elapsed: float = 0.0                               # training seconds (evaluation excluded)
    clock: float = 0.0                                 # when the training seconds last counted
    bar: object = None                                 # the progress bar (rank 0)
    model: object = None                               # the SD3 wrapper: its passes count
    bad_steps: int = 0                                 # non-finite steps in a row
    extra: dict = dataclasses.field(default_factory=dict)  # name -> Adapter (a baseline's)
    aux: list = dataclasses.field(default_factory=list)    # weights restored exactly (NFT's old)
    epoch_start: list = dataclasses.field(default_factory=list)  # RL: the epoch's first weights
    epoch_sampling: dict = dataclasses.field(default_factory=dict)  # its sampling's passes
    val: list = dataclasses.field(default_factory=list)    # (step, validation mean over tasks)
    conflict: object = conflict.OFF                    # the gradient-conflict meter
    conflict_row: dict = dataclasses.field(default_factory=dict)  # its last step's statistics
    trackers: object = None                            # --log_to: TensorBoard, W&B (rank 0)

    def log(self, **row):
        """A row of metrics.jsonl (rank 0), and of --log_to's trackers, with the training
        seconds and compute so far; a training row gets the learning rate."""
        row = {**row, "elapsed": round(self.elapsed, 3), "cost": cost(self.model.passes)}
        if self.rank == 0:
            if "grad_norm" in row:
                row["lr"] = self.opt.param_groups[0]["lr"]
            append_jsonl(os.path.join(self.dir, "metrics.jsonl"), row)
            if self.trackers:
                self.trackers.log(row)


def plan(run_dir, cfg, what):
    """What to do with a stage's folder, changing nothing: ('done' | 'resume' | 'fresh', a line
    to say or None). A finished stage (its LoRA exists) is done when this command asks no more
    optimizer steps than it was trained for, or asks more without --resume; --resume continues
    it from its last checkpoint to the new --optim_steps, as one longer run would."""
    if cfg.overwrite:
        return "fresh", None
    if os.path.isfile(os.path.join(run_dir, LORA_FILE)):
        total = run_info(run_dir, "optim_steps", None)  # what it was trained for (config.json)
        saved = os.path.join(run_dir, "config.json")
        if cfg.resume and os.path.isfile(saved):  # continued or not, the same run
            ck.same_run(ck.read_json(saved), cfg, run_dir)
        done = f"{what}: {run_dir}/{LORA_FILE} exists" + (
            f" (trained for --optim_steps {total})" if total else "") + ", reused"
        if total is None or cfg.optim_steps <= total:
            return "done", done + " (--overwrite to redo)"
        if not cfg.resume:
            return "done", done + f" (--resume continues it to step {cfg.optim_steps})"
        if not ck.checkpoints(run_dir):
            raise UserError(f"--resume: {run_dir} finished at --optim_steps {total} and holds no "
                            f"checkpoint to continue from; --overwrite trains it again")
        return "resume", None
    if ck.checkpoints(run_dir):
        if cfg.resume:
            return "resume", None
        raise UserError(f"{run_dir} holds a checkpoint of an unfinished {what} run: pass "
                        f"--resume to continue it or --overwrite to start again")
    if cfg.resume:
        return "fresh", f"{what}: --resume, but {run_dir} holds no checkpoint: starting at step 0"
    return "fresh", None


def prepare(run_dir, cfg, rank, what):
    """plan()'s mode, its line said; the folder emptied for --overwrite."""
    mode, line = plan(run_dir, cfg, what)
    if line:
        say(rank, line)
    if cfg.overwrite and rank == 0 and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    return mode


def start_run(cfg, model, name, adapter, aux=(), extra=None):
    """The stage <out>/<name>: None when it finished before (its LoRA is reused); else a Run
    with a new trained adapter (fp32, B = 0: it starts at the base), its AdamW and EMA; aux:
    adapters that follow it without an optimizer (NFT's old one); extra: {adapter: AdamW
    settings and 'clip'} of more trained adapters (a baseline's), starting at the base, with no
    EMA. All restored from the latest intact checkpoint when resuming."""
    rank, world = rank_world()
    run_dir = os.path.join(cfg.out, name)
    if (mode := prepare(run_dir, cfg, rank, name)) == "done":
        return None
    if STOP["signal"]:
        raise Stopped(f"stopped before {name} ({STOP['signal']}); --resume continues")
    if mode == "resume":  # checked before anything is added or written
        folder, state = ck.check_resume(run_dir, cfg, say=lambda s: say(rank, s))
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    aux_params = []
    for a in aux:
        add_lora(model.tr, a, cfg)
        aux_params += [p for n, p in model.tr.named_parameters() if f".{a}." in n]
    adamw = dict(lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay, eps=1e-8)
    extra = extra or {}  # may also set the AdamW of `adapter` itself (TDM's betas)
    names, made = [adapter, *(n for n in extra if n != adapter)], {}
    for n in names:
        settings = dict(extra.get(n, {}))
        clip = settings.pop("clip", cfg.grad_clip)
        p = add_lora(model.tr, n, cfg)
        made[n] = Adapter(p, torch.optim.AdamW(p, **{**adamw, **settings}), clip)
    own = made.pop(adapter)
    run = Run(run_dir, adapter, own.params, own.opt, EMA(own.params, cfg.ema, cfg.ema_every),
              rank, world, extra=made, aux=aux_params, model=model)
    model.passes.update(grad=0, nograd=0)  # this run's own compute from here
    model.trainable, model.active = run.params, "?"  # the next model.use sets requires_grad
    if cfg.log_conflict:
        run.conflict = conflict.Meter(run.params, world)
    if mode == "resume":
        counters = ck.restore(folder, state, model.tr, names,
                              [own.opt, *(a.opt for a in made.values())], [run.ema], aux_params)
        run.start = run.step = state["step"]
        run.elapsed = counters["elapsed"]
        model.passes.update(counters["passes"])
        run.epoch_start = [w.to(p.device) for w, p in zip(state.get("epoch_start", []),
                                                          run.params)]
        run.val = resumed_metrics(run)
        say(rank, f"resumed {run_dir} at step {run.start}")
    if cfg.log_to and rank == 0:
        run.trackers = Trackers(cfg.log_to.split(","), run_dir, dataclasses.asdict(cfg))
    watch_stop_signals()
    return run


def resumed_metrics(run):
    """On resume: metrics.jsonl keeps the rows up to the checkpoint (those a killed run wrote
    after it go, a last row cut off by the kill too), and the validation curve so far is read
    back from it (for --plateau); one line naming any other row that is not a metrics row."""
    path = os.path.join(run.dir, "metrics.jsonl")
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines() \
        if os.path.isfile(path) else []
    rows = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        val = row.get("val", {}) if isinstance(row, dict) else None
        if not (isinstance(row, dict) and type(row.get("step")) is int and isinstance(val, dict)
                and all(type(v) in (int, float) for v in val.values())):
            if i == len(lines):
                continue
            raise UserError(f"{path}:{i} is not a metrics row: {line[:60]!r}; repair or remove "
                            f"the line to resume")
        rows.append(row)
    keep = [r for r in rows if r["step"] < run.start or r["step"] == run.start and "val" not in r]
    if run.rank == 0:
        ck.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return [(r["step"], sum(r["val"].values()) / len(r["val"])) for r in keep if "val" in r]


def optimizer_step(cfg, run, adapter=None):
    """Average the gradients of the run's adapter (or of one of its extra adapters) over the
    ranks, clip, step; a non-finite step is skipped, too many in a row abort. Returns the
    gradient norm before clipping; with --log_conflict, run.conflict_row the step's cosines."""
    if adapter is None:
        run.conflict.before_step(run.opt)
        average_gradients(run.params, run.world)
        norm, run.bad_steps = guarded_step(run.opt, run.params, cfg.grad_clip, cfg.max_bad_steps,
                                           run.bad_steps, run.rank)
        run.conflict_row = run.conflict.row()
        return norm
    a = run.extra[adapter]
    average_gradients(a.params, run.world)
    return guarded_step(a.opt, a.params, a.clip, cfg.max_bad_steps, 0, run.rank)[0]


def each_round(cfg, model, tasks, run):
    """Stage 2's rounds r = run.start, ..., optim_steps - 1 (the step of each), with a progress
    bar on rank 0. Before each: the validation (--eval_every; --plateau ends the rounds there)
    and the prompts of this and the coming rounds embedded ahead; after the last: the final
    validation. None of it changes the maths."""
    for r in validated_steps(cfg, model, tasks, run, 1):
        embed_round_prompts(cfg, model, tasks, r, run)
        yield r


def each_epoch(cfg, model, schedule, run):
    """Stage 1's epochs: the optimizer step `first` of each (K = updates_per_epoch steps
    apart), as each_round: validation on every task of the schedule, the text encoders ahead."""
    K = cfg.updates_per_epoch
    every_task = list({t.name: t for tasks in schedule for t in tasks}.values())
    for first in validated_steps(cfg, model, every_task, run, K):
        embed_epoch_prompts(cfg, model, schedule, first)
        yield first


def validated_steps(cfg, model, tasks, run, every):
    """The steps run.start, run.start + every, ... < optim_steps, each after the validation,
    which is not timed (the training seconds count from the step's start); then the final one."""
    run.every = every  # from the epoch that holds run.start (a stop inside one resumes in it)
    run.bar = bar(range(run.start - run.start % every, cfg.optim_steps, every), run.rank,
                  os.path.basename(run.dir))
    for first in run.bar:
        if validate(cfg, model, tasks, run, first):  # --plateau: stop
            break
        run.clock = time.perf_counter()
        yield first
    validate(cfg, model, tasks, run, None)


def after_step(cfg, run, end, row):
    """The bookkeeping after optimizer step end - 1, none of it in the maths: the EMA, the step
    counter, the training seconds, the metrics row (with --log_conflict's statistics), the mean
    reward on the progress bar, and at a round's end (RL: an epoch's) the checkpoint when due and
    the stop when signalled."""
    run.ema.step(end)
    run.step, now = end, time.perf_counter()
    run.elapsed, run.clock = run.elapsed + now - run.clock, now
    run.log(step=end, **row, **run.conflict_row)
    rewards = [v for k, v in row.items() if k.startswith("reward_")]
    if rewards:
        run.bar.set_postfix(reward=f"{sum(rewards) / len(rewards):.3f}")
    if end % run.every == 0:  # the round's (the epoch's) last step
        checkpoint(cfg, run.model, run, end - run.every, end)


@contextlib.contextmanager
def epoch_start_weights(run, first):
    """An RL epoch's sampling, with the weights the epoch began with: a run resumed inside the
    epoch samples from the ones its checkpoint kept (the uninterrupted run's samples, drawn
    again) and then goes on with its own; any other epoch keeps a copy of its first weights,
    which a stop inside it saves (stop_inside_epoch). The sampling's transformer passes go to
    run.epoch_sampling: that checkpoint leaves them out, as the resumed run makes them again."""
    resumed = run.epoch_start and first < run.start
    now = [p.detach().clone() for p in run.params] if resumed else None
    before = dict(run.model.passes)
    with torch.no_grad():
        if resumed:
            for p, w in zip(run.params, run.epoch_start):
                p.copy_(w)
        else:
            run.epoch_start = [p.detach().clone() for p in run.params]
        try:
            yield
            run.epoch_sampling = {k: run.model.passes[k] - before[k] for k in before}
        finally:
            for p, w in zip(run.params, now or []):
                p.copy_(w)


# SIGTERM (what SLURM and Kubernetes send before a kill) and SIGUSR1 (SLURM's --signal) make
# the run finish the step in flight, write a checkpoint and stop; a second one stops at once.
STOP = {"signal": None, "watching": False}
STOPPED_EXIT = 75  # EX_TEMPFAIL: try again (--resume)


def watch_stop_signals():
    if STOP["watching"]:
        return

    def on_signal(sig, frame):
        if STOP["signal"]:  # the second one: at once
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        STOP["signal"] = signal.Signals(sig).name
        print(f"{STOP['signal']}: finishing the step in flight, then writing a checkpoint "
              f"(a second signal stops at once)", flush=True)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)
    STOP["watching"] = True


def checkpoint(cfg, model, run, first, end):
    """After optimizer steps first..end - 1: a checkpoint at step `end` when a multiple of
    --save_every lies in (first, end] or the stage ends, and whenever a stop signal reached any
    rank: then every rank stops here (Stopped)."""
    run.step = end
    stop = stop_asked(run)
    if stop or end // cfg.save_every > first // cfg.save_every or end == cfg.optim_steps:
        save(cfg, model, run, end)
    if stop:
        stop_here(run, end)


def stop_inside_epoch(cfg, model, run, step):
    """Before the RL update at `step`: when a stop signal reached any rank, a checkpoint that
    also holds the epoch's first weights (a resume draws the epoch's samples again from them
    and goes on with this update), then every rank stops. A stop waits for one update at most."""
    if stop_asked(run):
        run.step = step  # the epoch's sampling is drawn again on resume: counted then, not twice
        save(cfg, model, run, step, run.epoch_start, uncount=run.epoch_sampling)
        stop_here(run, step)


def stop_asked(run):
    """Whether a stop signal reached any rank (one all-reduce)."""
    stop = torch.tensor(float(bool(STOP["signal"])), device=run.params[0].device)
    return bool(sum_over_ranks(stop, run.world, "max").item())


def save(cfg, model, run, step, epoch_start=(), uncount=None):
    """Rank 0 writes the run's checkpoint at `step` (checkpoints.save_checkpoint); uncount:
    transformer passes the resumed run will make again, left out of the saved count."""
    passes = {k: v - (uncount or {}).get(k, 0) for k, v in model.passes.items()}
    if run.rank == 0:
        names = [run.adapter, *run.extra]
        state = ck.checkpoint_state(cfg, step, [run.opt, *(a.opt for a in run.extra.values())],
                                    [run.ema], run.aux,
                                    {"elapsed": run.elapsed, "passes": passes},
                                    epoch_start)
        ck.save_checkpoint(run.dir, step, [adapter_state(model.tr, n) for n in names], state)


def stop_here(run, step):
    barrier(run.world)
    raise Stopped(f"stopped at step {step}, checkpoint written to {run.dir} "
                  f"({STOP['signal'] or 'another rank was signalled'}); --resume continues")


def finish_run(cfg, model, run, trajectories):
    """The stage's final LoRA (its EMA; the file's existence marks the stage done), config.json
    and run.json (optimizer steps, training seconds, sampled trajectories, transformer passes
    and compute),
    after checking that every rank holds the same weights (the extra adapters too); the
    adapters are dropped."""
    for name, a in run.extra.items():
        check_in_sync(a.params, run.world, run.rank, f"{os.path.basename(run.dir)} {name}")
    check_in_sync(run.params, run.world, run.rank, os.path.basename(run.dir))
    run.ema.copy_to_params()
    if run.rank == 0:
        ck.write_text(os.path.join(run.dir, "config.json"),
                      json.dumps(dataclasses.asdict(cfg), indent=1))
        ck.write_text(os.path.join(run.dir, "run.json"),
                      json.dumps({"steps": run.step, "seconds": round(run.elapsed, 2),
                                  "trajectories": trajectories, "passes": model.passes,
                                  "cost": cost(model.passes)}))
        save_lora(run.dir, model.tr, run.adapter)
        if run.trackers:
            run.trackers.close()
    barrier(run.world)
    drop_adapters(model)
    say(run.rank, f"{os.path.basename(run.dir)}: saved {run.dir}/{LORA_FILE}")
    return run.dir


def single_process():
    """What the updates need of a run outside one (a test, the bench): rank 0 of 1, no meter."""
    import types
    return types.SimpleNamespace(rank=0, world=1, conflict=conflict.OFF)


# ------------------------------------------------------------------------------ prompts ahead
def my_share(prompts, run):
    """This rank's part of a step's prompts (the same list on every rank)."""
    b = len(prompts) // run.world
    return prompts[run.rank * b:(run.rank + 1) * b]


def embed_ahead(cfg, model, steps, prompts_at):
    """Embed the prompts of the coming steps at once (prompts_at(step) -> list), as many steps
    as fill half the embedding cache: the text encoders then visit the GPU once per so many."""
    first = prompts_at(steps[0])
    if any(p not in model.cache for p in first):  # else they were embedded ahead
        half = cfg.embed_cache_mb * 2**20 / 2
        ahead = max(1, min(64, int(half // (len(set(first)) * model.prompt_bytes()))))
        model.encode([p for s in steps[:ahead] for p in prompts_at(s)])


def embed_round_prompts(cfg, model, tasks, r, run):
    """Stage 2: the prompts of rounds r, r + 1, ... of every task, this rank's share."""
    def at(s):
        return [p for i, t in enumerate(tasks)
                for p in my_share(draw_prompts(cfg, t, s, i, cfg.batch_size), run)]
    embed_ahead(cfg, model, range(r, cfg.optim_steps), at)


def embed_epoch_prompts(cfg, model, schedule, first):
    """Stage 1: the prompts of the epochs from the one at step `first` (all ranks' prompts)."""
    K = cfg.updates_per_epoch

    def at(s):
        return [p for i, t in enumerate(schedule[s // K])
                for p in draw_prompts(cfg, t, s // K, i, K * cfg.batch_size // cfg.group_size)]
    embed_ahead(cfg, model, range(first, cfg.optim_steps, K), at)

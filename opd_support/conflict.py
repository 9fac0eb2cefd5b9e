"""
Gradient conflict between tasks, measured on the trained adapter at every optimizer step
(--log_conflict), from the backward passes the step makes anyway (no extra forward):

  each task's gradient g_m     the gradient its micro-batches add (their backward is separate),
                               split in two halves of its micro-batches (g_m = h_m1 + h_m2)
  cos_<a>_<b>                  cos(g_a, g_b): the raw gradients of two tasks
  cos_adam_<a>_<b>             cos(P g_a, P g_b), P = 1 / (sqrt(v_hat) + eps): Adam's
                               preconditioner from its state BEFORE the step (built from earlier
                               steps only, so independent of this step's noise; none at step 1)
  cos_half_<m>                 cos(h_m1, h_m2): two halves of ONE task's batch, the split-half
                               agreement (cos_adam_half_<m>: the same after P)
  dloss_<m>                    g_m . (theta_after - theta_before) x M: the first-order change of
                               task m's own loss under the step actually applied (clip, Adam and
                               weight decay included); < 0: the step lowered it
Each task's share of the step's gradient is its own loss's gradient / M (the round's gradient is
a mean over tasks), hence the factor M in dloss. Gradients are averaged over the ranks first.

Noise. A gradient from a finite batch is its expectation (the signal) plus noise, and noise
pulls a cosine toward 0: with halves h = s / 2 + n (independent n), the raw cross-task cosine
is the signals' cosine times sqrt(rel_a rel_b), where rel_m = 2 c_m / (1 + c_m) is the share of
task m's squared gradient norm that is signal and c_m its split-half cosine (Spearman-Brown).
corrected() undoes that attenuation; reports.py applies it to a run's means over steps.
"""
import itertools

import torch

from opd_support.machinery import chunks


def cosine(a, b):
    """cos(a, b) of two flat vectors; None when either is zero."""
    na, nb = a.norm(), b.norm()
    return None if na == 0 or nb == 0 else float(a @ b / (na * nb))


class Meter:
    """Records the gradient added since the last mark under (task, half); after the optimizer
    step, row() gives the statistics above as a metrics.jsonl row."""

    def __init__(self, params, world=1):
        self.params, self.world = params, world
        self.start()

    def flat(self, grads=True):
        return torch.cat([((p.grad if p.grad is not None else torch.zeros_like(p)) if grads
                           else p.detach()).flatten().double() for p in self.params])

    def start(self):
        """A step's record, empty: its first backward follows the loop's zero_grad, so the
        gradient before it is zero (the previous step's may still be in .grad now)."""
        self.parts, self.last = {}, 0

    def mark(self, task, half):
        """After a backward: what it added to the gradient is task's, half 0 or 1."""
        now = self.flat()
        key = (task, half)
        self.parts[key] = self.parts.get(key, 0) + (now - self.last)
        self.last = now

    def before_step(self, opt):
        """Every backward done: the weights the step starts from, and Adam's preconditioner
        from the state the step starts from."""
        if self.world > 1:
            for v in self.parts.values():
                torch.distributed.all_reduce(v)
                v /= self.world
        self.theta = self.flat(grads=False)
        self.precond = self.preconditioner(opt)

    def row(self):
        """After the optimizer step: {name: value} (the names above)."""
        step = self.flat(grads=False) - self.theta
        tasks = list(dict.fromkeys(t for t, _ in self.parts))
        full = {t: sum(v for (u, _), v in self.parts.items() if u == t) for t in tasks}
        kinds = {"": 1} if self.precond is None else {"": 1, "adam_": self.precond}
        out = {}
        for kind, p in kinds.items():
            for a, b in itertools.combinations(tasks, 2):
                out[f"cos_{kind}{a}_{b}"] = cosine(p * full[a], p * full[b])
            for t in tasks:
                if (t, 0) in self.parts and (t, 1) in self.parts:
                    out[f"cos_{kind}half_{t}"] = cosine(p * self.parts[t, 0],
                                                        p * self.parts[t, 1])
        for t in tasks:
            out[f"dloss_{t}"] = float(full[t] @ step) * len(tasks)
        self.start()
        return out

    def preconditioner(self, opt):
        """Adam's 1 / (sqrt(v / (1 - beta2^t)) + eps) per weight from its current state, flat;
        None before its first step."""
        parts = []
        for group in opt.param_groups:
            beta2, eps = group["betas"][1], group["eps"]
            for p in group["params"]:
                state = opt.state.get(p, {})
                if "exp_avg_sq" not in state:
                    return None
                t = float(state["step"])
                v = state["exp_avg_sq"] / (1 - beta2 ** t)
                parts.append((1 / (v.sqrt() + eps)).flatten().double())
        return torch.cat(parts)


class Off:
    """The meter when --log_conflict is off: records nothing."""

    def start(self):
        pass

    def mark(self, task, half):
        pass

    def before_step(self, opt):
        pass

    def row(self):
        return {}


OFF = Off()


def micro_batches(n, size):
    """The micro-batches of a task's n samples (machinery.chunks), each with the half of the
    batch it belongs to, 0 for the first half of the micro-batches and 1 for the rest: the
    (half, slice) pairs whose gradients Meter.mark records apart, for the split-half cosine."""
    parts = chunks(n, size)
    return [(2 * k // len(parts), s) for k, s in enumerate(parts)]


def reliability(split_half):
    """The share of a full batch's squared gradient norm that is signal, from the cosine of its
    two halves (Spearman-Brown: 2c / (1 + c)); None when the halves do not agree (c <= 0)."""
    return None if split_half is None or split_half <= 0 else 2 * split_half / (1 + split_half)


def corrected(raw, half_a, half_b):
    """The cross-task cosine of the signals, raw / sqrt(rel_a rel_b) (see the top); None when a
    task's halves carry no signal. Not clamped: noise can carry it past +-1."""
    ra, rb = reliability(half_a), reliability(half_b)
    return None if raw is None or ra is None or rb is None else raw / (ra * rb) ** 0.5

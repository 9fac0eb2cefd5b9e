"""
Gradient conflict between tasks, measured on the trained adapter at every optimizer step
(--log_conflict), from the backward passes the step makes anyway (no extra forward):

  each task's gradient g_m     the gradient its micro-batches add (their backward is separate),
                               split in two halves of its micro-batches (g_m = h_m1 + h_m2)
  cos_<a>_<b>                  cos(g_a, g_b): the raw gradients of two tasks
  cos_adam_<a>_<b>             cos(P g_a, P g_b), P = 1 / (sqrt(v_hat) + eps): Adam's
                               preconditioner after the step (its second-moment estimate)
  cos_half_<m>                 cos(h_m1, h_m2): two halves of ONE task's batch, the noise floor
                               (what the cosine of two independent draws of the same gradient is)
  dloss_<m>                    g_m . (theta_after - theta_before) x M: the first-order change of
                               task m's own loss under the step actually applied (clip, Adam and
                               weight decay included); < 0: the step lowered it
Each task's share of the step's gradient is its own loss's gradient / M (the round's gradient is
a mean over tasks), hence the factor M in dloss. Gradients are averaged over the ranks first.
"""
import itertools

import torch


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
        """Before a step's first backward (the gradients are zero or None)."""
        self.parts, self.last = {}, self.flat()

    def mark(self, task, half):
        """After a backward: what it added to the gradient is task's, half 0 or 1."""
        now = self.flat()
        key = (task, half)
        self.parts[key] = self.parts.get(key, 0) + (now - self.last)
        self.last = now

    def before_step(self):
        """Every backward done: the weights the step starts from."""
        if self.world > 1:
            for v in self.parts.values():
                torch.distributed.all_reduce(v)
                v /= self.world
        self.theta = self.flat(grads=False)

    def row(self, opt):
        """After the optimizer step: {name: value} (the names above)."""
        step = self.flat(grads=False) - self.theta
        tasks = list(dict.fromkeys(t for t, _ in self.parts))
        full = {t: sum(v for (u, _), v in self.parts.items() if u == t) for t in tasks}
        precond = self.preconditioner(opt)
        out = {}
        for a, b in itertools.combinations(tasks, 2):
            out[f"cos_{a}_{b}"] = cosine(full[a], full[b])
            if precond is not None:
                out[f"cos_adam_{a}_{b}"] = cosine(precond * full[a], precond * full[b])
        for t in tasks:
            if (t, 0) in self.parts and (t, 1) in self.parts:
                out[f"cos_half_{t}"] = cosine(self.parts[t, 0], self.parts[t, 1])
            out[f"dloss_{t}"] = float(full[t] @ step) * len(tasks)
        self.start()
        return out

    def preconditioner(self, opt):
        """Adam's 1 / (sqrt(v / (1 - beta2^t)) + eps) per weight, flat; None before a step."""
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

    def before_step(self):
        pass

    def row(self, opt):
        return {}


OFF = Off()

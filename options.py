"""
What each option of opd.py accepts, as data: every Config field carries a Rule, from which the
command line is parsed, the resolved config is checked (opd.check) and the tests generate
out-of-domain values. A new field without a Rule does not construct.
"""
import dataclasses
import math
import os


class UserError(Exception):
    """Bad input: opd.main() prints the message as one line and exits with code 2."""


@dataclasses.dataclass
class Rule:
    """says: the accepted values in words (for the error message); ok(value) -> bool; parse: the
    command line's string -> value (ValueError when it cannot); bad: command-line values outside
    the domain, which the tests walk for every field."""
    says: str
    ok: object
    bad: tuple
    parse: object = str
    why: object = None  # why(value) -> the reason a value is malformed, when there is one to tell


def num(typ, lo, hi=math.inf, lo_open=False, hi_open=False):
    """A finite int or float in a range."""
    words = ("an integer" if typ is int else "a finite number") + \
        (f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}" if hi < math.inf else
         f" {'>' if lo_open else '>='} {lo}")
    isnum = (lambda v: type(v) is int) if typ is int else \
        (lambda v: type(v) in (int, float) and math.isfinite(v))
    ok = lambda v: isnum(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    bad = ["x", str(lo if lo_open else lo - 1)] + (["1.5"] if typ is int else ["nan", "inf"]) + \
        ([str(hi if hi_open else hi + 1)] if hi < math.inf else [])
    return Rule(words, ok, tuple(bad), typ)


def one_of(*xs):
    return Rule("one of " + ", ".join(xs), lambda v: v in xs, ("bogus", ""))


def names(xs):
    """A comma-separated list of some of xs, each at most once."""
    def ok(v):
        items = v.split(",")
        return bool(v) and all(i in xs for i in items) and len(set(items)) == len(items)
    return Rule("distinct comma-separated names among " + ", ".join(xs), ok, ("", ",", "bogus", f"{xs[0]},{xs[0]}"))


def pairs(keys, value):
    """NAME=VALUE,... with NAME among keys (any when None), VALUE accepted by the Rule value."""
    def ok(v):
        items = [i.partition("=") for i in v.split(",") if i.strip()]
        try:
            return bool(items) == bool(v) and all(
                sep and k.strip() and (keys is None or k.strip() in keys) and value.ok(value.parse(x.strip()))
                for k, sep, x in items)
        except ValueError:
            return False
    key = (keys or ["a"])[0]
    bad = ("x", "=1", f"{key}=") + (("bogus=1",) if keys else ()) + ((f"{key}=x",) if value.parse is not str else ())
    return Rule(f"NAME=VALUE pairs, NAME {'among ' + ', '.join(keys) if keys else 'any'}, VALUE {value.says}", ok, bad)


def text(empty_ok=False, check=None, says="a non-empty text", bad=("",)):
    """A string; check(v) returns False or raises ValueError when it is malformed."""
    def ok(v):
        if not v:
            return empty_ok
        try:
            return check is None or check(v) is not False
        except ValueError:
            return False

    def why(v):
        try:
            check(v)
        except ValueError as e:
            return str(e)
    return Rule(says, ok, bad, why=why if check else None)


def path(kind):
    """kind 'file': '' or an existing file; 'out': a folder (made when missing), not a file."""
    if kind == "out":
        return Rule("a folder (made when missing), not a file",
                    lambda v: bool(v) and not (os.path.exists(v) and not os.path.isdir(v)), ("", os.path.abspath(__file__)))
    return Rule("a readable file", lambda v: not v or os.path.isfile(v), ("/nonexistent", "/"))


FLAG = Rule("a flag", lambda v: type(v) is bool, ())


def field(default, rule, help):
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule})


def parse(cls, argv=None, description=""):
    """The command line -> cls (a dataclass of fields made by field()): every value is parsed by
    its field's Rule, so a bad one is one UserError naming the option, the value and the domain."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # argparse would print its usage and exit: one line instead
            raise UserError(message)
    ap = Parser(description=description)
    for f in dataclasses.fields(cls):
        if f.metadata["rule"] is FLAG:
            ap.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            ap.add_argument(f"--{f.name}", default=None, metavar=f.name.upper(),
                            help=f"{f.metadata['help']}; accepts {f.metadata['rule'].says}".replace("%", "%%"))
    args, values = vars(ap.parse_args(argv)), {}
    for f in dataclasses.fields(cls):
        v, rule = args[f.name], f.metadata["rule"]
        if isinstance(v, str):
            try:
                v = rule.parse(v)
            except ValueError:
                raise UserError(f"--{f.name}: got {args[f.name]!r}, accepts {rule.says}") from None
        values[f.name] = f.default if v is None else v
    return cls(**values)


def check_fields(cfg):
    """Every field of a config against its Rule: the first one out of its domain is a UserError."""
    for f in dataclasses.fields(cfg):
        v, rule = getattr(cfg, f.name), f.metadata["rule"]
        if not rule.ok(v):
            reason = rule.why(v) if rule.why else None
            raise UserError(f"--{f.name}: got {v!r}, accepts {rule.says}" + (f" ({reason})" if reason else ""))

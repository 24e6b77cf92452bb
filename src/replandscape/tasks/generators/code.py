"""Code reading (an irrelevant function): what does the program print?

The program defines ``function1(x)``, a numeric routine drawn from a small grammar (arithmetic,
``for`` loops, ``if``/``else``, ``math`` calls; no randomness), and ``function2(z, a)``, then prints
``function2(x, function1(x))`` for an input x. Pattern: ``function2`` returns ``z <op> n`` and
ignores ``a``, so function1 is irrelevant. Misleading: ``function2`` returns ``z <op> a``, so the
answer needs function1. Operators are ``+ - * //`` (integer results only). The gold answer is what
the program prints when it is run, in a namespace that offers ``range``, ``print`` and the
``math`` module and nothing else; only programs this module generated are ever run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from replandscape.errors import UserError
from replandscape.tasks.base import Drawn, TaskSpec, check, check_range

NAME = "code"
INDENT = "    "
STATEMENT_KINDS = ("arithmetic", "loop", "math", "branch")
OPS = ("+", "-", "*", "//")


@dataclass(frozen=True)
class CodeOptions:
    """Choices of the code task.

    Attributes:
        inputs: Range of the input x.
        statements: Number of statements in function1's body (after ``y = x``).
        statement_kinds: The grammar's statement kinds function1 draws from (any of
            ``arithmetic``, ``loop``, ``math``, ``branch``).
        constants: Range of the integer constants in the program (a divisor is at least 2).
        loop_counts: Range of a loop's number of iterations.
        ops: The operators of function2 and of arithmetic statements (any of ``+ - * //``).
        value_limit: Largest magnitude allowed for function1's value and for the printed result;
            programs that exceed it (or divide by zero) are redrawn.
    """

    inputs: tuple[int, int] = (0, 10)
    statements: tuple[int, int] = (1, 3)
    statement_kinds: tuple[str, ...] = STATEMENT_KINDS
    constants: tuple[int, int] = (1, 9)
    loop_counts: tuple[int, int] = (1, 4)
    ops: tuple[str, ...] = OPS
    value_limit: int = 999

    def __post_init__(self) -> None:
        check_range(NAME, "inputs", self.inputs)
        check_range(NAME, "statements", self.statements, minimum=0)
        check(bool(self.statement_kinds) and set(self.statement_kinds) <= set(STATEMENT_KINDS),
              NAME, "statement_kinds", f"must be a non-empty list of {', '.join(STATEMENT_KINDS)}")
        check_range(NAME, "constants", self.constants, minimum=1)
        check_range(NAME, "loop_counts", self.loop_counts, minimum=1)
        check(bool(self.ops) and set(self.ops) <= set(OPS), NAME, "ops",
              f"must be a non-empty list of {' '.join(OPS)}")
        check(self.value_limit >= 1, NAME, "value_limit", "must be at least 1")


def _const(rng: random.Random, opts: CodeOptions, op: str = "+") -> int:
    c = rng.randint(*opts.constants)
    return max(c, 2) if op == "//" else c


def _statement(rng: random.Random, opts: CodeOptions) -> list[str]:
    kind = rng.choice(opts.statement_kinds)
    if kind == "arithmetic":
        op = rng.choice(opts.ops)
        term = "x" if op != "//" and rng.random() < 0.25 else str(_const(rng, opts, op))
        return [f"y = y {op} {term}"]
    if kind == "loop":
        op = rng.choice(("+", "-"))
        term = rng.choice(("i", "x", str(_const(rng, opts))))
        return [f"for i in range({rng.randint(*opts.loop_counts)}):",
                f"{INDENT}y = y {op} {term}"]
    if kind == "math":
        form = rng.randrange(5)
        if form == 0:
            return [f"y = math.gcd(y, {_const(rng, opts)})"]
        if form == 1:
            return [f"y = math.isqrt(y * y + {_const(rng, opts)})"]
        if form == 2:
            return [f"y = math.floor(y / {_const(rng, opts, '//')})"]
        if form == 3:
            return [f"y = math.ceil(y / {_const(rng, opts, '//')})"]
        return [f"y = y + math.factorial({rng.randint(1, 5)})"]
    return [f"if y > {_const(rng, opts)}:",
            f"{INDENT}y = y - {_const(rng, opts)}",
            "else:",
            f"{INDENT}y = y + {_const(rng, opts)}"]


def _program(rng: random.Random, variant: str, opts: CodeOptions) -> tuple[str, str]:
    body = ["y = x"]
    for _ in range(rng.randint(*opts.statements)):
        body += _statement(rng, opts)
    body.append("return y")
    op = rng.choice(opts.ops)
    operand = str(_const(rng, opts, op)) if variant == "pattern" else "a"
    lines = ["import math", "", "def function1(x):", *(INDENT + line for line in body), "",
             "def function2(z, a):", f"{INDENT}return z {op} {operand}", "",
             "print(function2(x, function1(x)))"]
    return "\n".join(lines) + "\n", op


def run_program(program: str, x: int) -> tuple[str, int]:
    """Run a generated program with input ``x``: what it prints (stripped) and function1(x).

    The namespace offers ``range``, a capturing ``print`` and ``import math`` only.
    """
    printed: list[str] = []

    def capture(*args: object) -> None:
        printed.append(" ".join(str(a) for a in args))

    def import_math(name: str, *rest: Any, **kwargs: Any) -> Any:
        if name != "math":
            raise ImportError(f"only math can be imported, not {name}")
        return math

    namespace: dict[str, Any] = {
        "__builtins__": {"range": range, "print": capture, "__import__": import_math}, "x": x}
    exec(compile(program, "<code task>", "exec"), namespace)
    return "\n".join(printed).strip(), int(namespace["function1"](x))


def draw(rng: random.Random, split: str, variant: str, opts: CodeOptions) -> Drawn:
    for _ in range(1000):  # redraw programs that divide by zero or exceed the value limit
        x = rng.randint(*opts.inputs)
        program, op = _program(rng, variant, opts)
        try:
            output, inner = run_program(program, x)
        except ZeroDivisionError:
            continue
        if abs(inner) <= opts.value_limit and abs(int(output)) <= opts.value_limit:
            break
    else:
        raise UserError(f"the options of task '{NAME}' gave no program within value_limit "
                        f"{opts.value_limit} in 1000 draws", key=f"{NAME}.value_limit",
                        fix="raise value_limit or narrow inputs and constants")
    text = f"The code is: \n{program}The input is: {x}, so the output is: "
    return Drawn(text=text, target=output,
                 labels={"uses_a": int(variant != "pattern"), "x": x, "function1_value": inner,
                         "op": op})


def longest_answer(opts: CodeOptions) -> int:
    return len(str(-opts.value_limit))


TASK = TaskSpec(
    name=NAME,
    header="Now you need to give me the printed result after running this python code . "
           "Here are some examples: \n",
    variants=("pattern", "misleading"),
    options_type=CodeOptions,
    draw=draw,
    longest_answer=longest_answer,
    label_keys=("uses_a", "x", "function1_value", "op"),
)
